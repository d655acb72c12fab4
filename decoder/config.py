"""Reading ``cosyvoice.yaml`` as data, never as code.

Owns: a safe YAML loader that understands the hyperpyyaml tags of the upstream file (``!new:``,
``!name:``, ``!apply:``, ``!ref``, ``!copy``) as plain data nodes, the table of upstream class paths
we know how to build, and the frozen hyper-parameter dataclasses of the flow decoder
(``EncoderConfig``, ``DiTConfig``, ``FlowConfig``) plus ``DecoderConfig`` that bundles them with the
vocoder's ``HiFTConfig`` and the frontend's ``MelConfig``.
Does not own: the HiFT and mel hyper-parameters themselves (``decoder/vocoder.py`` and
``decoder/frontend.py`` define those dataclasses), building modules, loading weights.

Why not hyperpyyaml: ``load_hyperpyyaml`` imports and calls whatever class path the file names,
so a model folder could run arbitrary code. Here a tag only records its class path and arguments;
a path outside the table below is a :class:`core.errors.ModelError` that names it.

Only the top-level keys ``mel_conf``, ``flow`` and ``hift`` are read; anything else in the file
(e.g. an ``llm`` or ``feat_extractor`` entry of other CosyVoice releases) is ignored, unevaluated.
"""

from __future__ import annotations

import ast
import logging
import operator
import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Mapping

import yaml

from decoder.frontend import MelConfig
from decoder.vocoder import HiFTConfig
from core.errors import ModelError

log = logging.getLogger(__name__)

# Upstream classes by the tail of their dotted path (module.Class), so that both the Step-Audio
# package (``stepvocoder.cosyvoice2.flow.flow.CausalMaskedDiffWithXvec``) and the CosyVoice one
# (``cosyvoice.flow.flow.CausalMaskedDiffWithXvec``) are recognised.
KNOWN_CLASSES = {
    "flow.flow.CausalMaskedDiffWithXvec": "flow",
    "embedding.dual_codebook.DualCodebookEmbedding": "dual_codebook_embedding",
    "transformer.upsample_encoder_v2.UpsampleConformerEncoderV2": "upsample_conformer_encoder_v2",
    "flow.flow_matching.CausalConditionalCFM": "causal_conditional_cfm",
    "flow.decoder_dit.DiT": "dit",
    "hifigan.generator.HiFTGenerator": "hift",
    "hifigan.f0_predictor.ConvRNNF0Predictor": "conv_rnn_f0_predictor",
}


@dataclass(frozen=True)
class TaggedNode:
    """A ``!new:``/``!name:``/``!apply:`` node: the class path and its (unevaluated) arguments."""

    tag: str            # "new", "name" or "apply"
    path: str           # dotted class or function path, as written in the file
    kwargs: Mapping[str, Any]
    args: tuple = ()


@dataclass(frozen=True)
class _Ref:
    expression: str     # e.g. "<sample_rate> // 2"


class _TaggedLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` plus hyperpyyaml's tags, all turned into inert data."""


def _tagged_constructor(kind: str):
    def construct(loader: _TaggedLoader, path: str, node: yaml.Node) -> TaggedNode:
        if isinstance(node, yaml.MappingNode):
            return TaggedNode(kind, path, loader.construct_mapping(node, deep=True))
        if isinstance(node, yaml.SequenceNode):
            return TaggedNode(kind, path, {}, tuple(loader.construct_sequence(node, deep=True)))
        value = loader.construct_scalar(node)
        return TaggedNode(kind, path, {}, (value,) if value not in ("", None) else ())
    return construct


def _construct_ref(loader: _TaggedLoader, node: yaml.Node) -> _Ref:
    return _Ref(str(loader.construct_scalar(node)))


for _kind in ("new", "name", "apply"):
    _TaggedLoader.add_multi_constructor(f"!{_kind}:", _tagged_constructor(_kind))
_TaggedLoader.add_constructor("!ref", _construct_ref)
_TaggedLoader.add_constructor("!copy", _construct_ref)


# --------------------------------------------------------------------------- references

_REF = re.compile(r"<([^<>]+)>")
def _pow(base: Any, exponent: Any) -> Any:
    if abs(exponent) > 64:  # 10 ** 10 ** 10 would compute for minutes; no config value needs this
        raise ValueError("exponent too large")
    return operator.pow(base, exponent)


_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: _pow}


def _lookup(root: Mapping[str, Any], key: str) -> Any:
    value: Any = root
    for part in re.findall(r"[^.\[\]]+", key):
        if isinstance(value, Mapping) and part in value:
            value = value[part]
        elif isinstance(value, (list, tuple)) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        else:
            raise ModelError(f"cosyvoice.yaml: !ref <{key}> points at nothing")
    return value


def _arith(node: ast.AST) -> Any:
    """Evaluate numbers and + - * / // % ** only (hyperpyyaml allows arithmetic in refs)."""
    if isinstance(node, ast.Expression):
        return _arith(node.body)
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
        return node.value
    if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
        return _BINOPS[type(node.op)](_arith(node.left), _arith(node.right))
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        return -_arith(node.operand)
    raise ValueError("not arithmetic")


def _resolve(value: Any, root: Mapping[str, Any], depth: int = 0) -> Any:
    if depth > 32:
        raise ModelError("cosyvoice.yaml: !ref references form a cycle")
    if isinstance(value, _Ref):
        whole = _REF.fullmatch(value.expression.strip())
        if whole:
            return _resolve(_lookup(root, whole.group(1)), root, depth + 1)
        text = _REF.sub(lambda m: str(_resolve(_lookup(root, m.group(1)), root, depth + 1)), value.expression)
        try:
            return _arith(ast.parse(text, mode="eval"))
        except (SyntaxError, ValueError, ArithmeticError, RecursionError):
            return text  # string interpolation, e.g. "<folder>/file.txt"
    if isinstance(value, TaggedNode):
        return TaggedNode(value.tag, value.path, {k: _resolve(v, root, depth) for k, v in value.kwargs.items()},
                          tuple(_resolve(v, root, depth) for v in value.args))
    if isinstance(value, Mapping):
        return {k: _resolve(v, root, depth) for k, v in value.items()}
    if isinstance(value, list):
        return [_resolve(v, root, depth) for v in value]
    return value


# --------------------------------------------------------------------------- dataclasses

@dataclass(frozen=True)
class EncoderConfig:
    """``UpsampleConformerEncoderV2`` (defaults: the shipped values, pipeline.md §3.1)."""

    input_size: int = 512
    output_size: int = 512
    pre_lookahead_len: int = 3
    num_blocks: int = 6
    num_up_blocks: int = 4
    up_stride: int = 2
    up_scale_factor: float = 2.0
    attention_heads: int = 8
    linear_units: int = 2048
    key_bias: bool = True

    def __post_init__(self) -> None:
        if self.output_size % self.attention_heads:
            raise ValueError(f"output_size {self.output_size} is not divisible by attention_heads "
                             f"{self.attention_heads}")
        # The second stage re-embeds the upsampled output with a Linear(input_size -> output_size).
        if self.input_size != self.output_size:
            raise ValueError(f"input_size {self.input_size} must equal output_size {self.output_size} "
                             "(the up_embed layer takes the encoder's own output)")
        if self.up_scale_factor != self.up_stride:
            raise ValueError(f"up_scale_factor {self.up_scale_factor} must equal up_stride {self.up_stride}")


@dataclass(frozen=True)
class DiTConfig:
    """The flow-matching estimator ``DiT`` (defaults: shipped values)."""

    in_channels: int = 320
    out_channels: int = 80
    mlp_ratio: float = 4.0
    depth: int = 16
    num_heads: int = 8
    head_dim: int = 64
    hidden_size: int = 512


@dataclass(frozen=True)
class FlowConfig:
    """``CausalMaskedDiffWithXvec`` with its embedding, encoder and CFM solver (shipped defaults)."""

    input_size: int = 512
    output_size: int = 80
    spk_embed_dim: int = 192
    vocab_size: int = 5121
    embedding_size: int = 512          # DualCodebookEmbedding input_size (two halves of 256)
    inference_cfg_rate: float = 0.7
    encoder: EncoderConfig = EncoderConfig()
    estimator: DiTConfig = DiTConfig()

    def __post_init__(self) -> None:
        if self.embedding_size // 2 * 2 != self.encoder.input_size:
            raise ValueError(f"the dual-codebook embedding gives {self.embedding_size // 2 * 2} channels but the "
                             f"encoder takes {self.encoder.input_size}")
        # The estimator sees x, mu, speaker and cond stacked: 4 x output_size channels.
        if self.estimator.in_channels != 4 * self.output_size or self.estimator.out_channels != self.output_size:
            raise ValueError(f"estimator in/out channels {self.estimator.in_channels}/{self.estimator.out_channels} "
                             f"do not fit output_size {self.output_size} (expected {4 * self.output_size}/"
                             f"{self.output_size})")
        if self.inference_cfg_rate <= 0:
            raise ValueError(f"inference_cfg_rate must be positive, not {self.inference_cfg_rate}")


@dataclass(frozen=True)
class DecoderConfig:
    """Everything ``cosyvoice.yaml`` says: prompt mel, flow decoder, vocoder."""

    mel: MelConfig
    flow: FlowConfig
    hift: HiFTConfig


# --------------------------------------------------------------------------- mapping

def _class_of(node: Any, where: str) -> str:
    if not isinstance(node, TaggedNode) or node.tag != "new":
        raise ModelError(f"cosyvoice.yaml: {where} must be a '!new:<class>' entry, found {type(node).__name__}")
    for tail, name in KNOWN_CLASSES.items():
        if node.path == tail or node.path.endswith("." + tail):
            if node.args:
                raise ModelError(f"cosyvoice.yaml: {where} ({node.path}) has positional arguments; "
                                 "only keyword arguments are supported")
            return name
    raise ModelError(f"cosyvoice.yaml: unknown class {node.path!r} at {where}; this loader knows only "
                     + ", ".join(sorted(t.rsplit(".", 1)[1] for t in KNOWN_CLASSES)))


def _expect(node: TaggedNode, where: str, name: str) -> None:
    got = _class_of(node, where)
    if got != name:
        raise ModelError(f"cosyvoice.yaml: {where} is {node.path!r}, expected a "
                         f"{[t for t, n in KNOWN_CLASSES.items() if n == name][0].rsplit('.', 1)[1]}")


def _coerce(value: Any, default: Any, where: str) -> Any:
    """``value`` as the type of the field's default (bool, int, float); other fields pass through."""
    if isinstance(value, (TaggedNode, _Ref)):
        path = f" ({value.tag}:{value.path})" if isinstance(value, TaggedNode) else ""
        raise ModelError(f"cosyvoice.yaml: {where} must be a plain value, not a tagged entry{path}")
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ModelError(f"cosyvoice.yaml: {where} must be true or false, not {value!r}")
        return value
    if isinstance(default, (int, float)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ModelError(f"cosyvoice.yaml: {where} must be a number, not {value!r}")
        if isinstance(default, int) and value != int(value):
            raise ModelError(f"cosyvoice.yaml: {where} must be a whole number, not {value!r}")
        return type(default)(value)
    return value


def _take(cls: type, kwargs: Mapping[str, Any], where: str, *, ignore: tuple[str, ...] = (),
          strict: bool = True) -> Any:
    """``cls(**kwargs)`` for the dataclass fields; unknown keys are an error when ``strict``."""
    defaults = {f.name: f.default for f in fields(cls)}
    values, unknown = {}, []
    for key, value in kwargs.items():
        if key in defaults:
            values[key] = _coerce(value, defaults[key], f"{where}.{key}")
        elif key not in ignore:
            unknown.append(key)
    if unknown and strict:
        raise ModelError(f"cosyvoice.yaml: {where} has unsupported arguments: {', '.join(sorted(unknown))}")
    if unknown:
        log.debug("cosyvoice.yaml: %s: ignoring %s", where, ", ".join(sorted(unknown)))
    try:
        return cls(**values)
    except (TypeError, ValueError) as exc:
        raise ModelError(f"cosyvoice.yaml: {where}: {exc}") from None


# Values of the encoder that select code paths; only the upstream choices are implemented.
_ENCODER_CHOICES = {"input_layer": "linear", "pos_enc_layer_type": "rel_pos_espnet",
                    "selfattention_layer_type": "rel_selfattn", "activation_type": "swish",
                    "normalize_before": True}


def _flow_config(node: TaggedNode) -> FlowConfig:
    _expect(node, "flow", "flow")
    kw = dict(node.kwargs)
    if kw.get("output_type", "mel") != "mel":
        raise ModelError(f"cosyvoice.yaml: flow.output_type {kw['output_type']!r} is not supported (only 'mel')")
    for part in ("encoder", "decoder", "input_embedding"):
        if part not in kw:
            raise ModelError(f"cosyvoice.yaml: flow has no '{part}' entry")
    emb = kw.pop("input_embedding")
    _expect(emb, "flow.input_embedding", "dual_codebook_embedding")
    enc = kw.pop("encoder")
    _expect(enc, "flow.encoder", "upsample_conformer_encoder_v2")
    for key, wanted in _ENCODER_CHOICES.items():
        if key in enc.kwargs and enc.kwargs[key] != wanted:
            raise ModelError(f"cosyvoice.yaml: flow.encoder.{key}={enc.kwargs[key]!r} is not supported "
                             f"(only {wanted!r})")
    # The upstream encoder takes **kwargs, so extra keys there are legal and meaningless.
    encoder = _take(EncoderConfig, enc.kwargs, "flow.encoder", strict=False,
                    ignore=tuple(_ENCODER_CHOICES) + ("dropout_rate", "positional_dropout_rate",
                                                      "attention_dropout_rate"))
    cfm = kw.pop("decoder")
    _expect(cfm, "flow.decoder", "causal_conditional_cfm")
    cfm_kw = dict(cfm.kwargs)
    if "estimator" not in cfm_kw:
        raise ModelError("cosyvoice.yaml: flow.decoder has no 'estimator' entry")
    est = cfm_kw.pop("estimator")
    _expect(est, "flow.decoder.estimator", "dit")
    estimator = _take(DiTConfig, est.kwargs, "flow.decoder.estimator")
    unknown = set(cfm_kw) - {"inference_cfg_rate"}
    if unknown:
        raise ModelError(f"cosyvoice.yaml: flow.decoder has unsupported arguments: {', '.join(sorted(unknown))}")
    emb_kw = dict(emb.kwargs)
    if set(emb_kw) - {"vocab_size", "input_size"}:
        raise ModelError("cosyvoice.yaml: flow.input_embedding has unsupported arguments: "
                         + ", ".join(sorted(set(emb_kw) - {"vocab_size", "input_size"})))
    if emb_kw.get("vocab_size", kw.get("vocab_size", 5121)) != kw.get("vocab_size", 5121):
        raise ModelError("cosyvoice.yaml: flow.input_embedding.vocab_size differs from flow.vocab_size")
    kw.pop("output_type", None)
    values = dict(kw, encoder=encoder, estimator=estimator,
                  inference_cfg_rate=cfm_kw.get("inference_cfg_rate", 0.7),
                  embedding_size=emb_kw.get("input_size", kw.get("input_size", 512)))
    return _take(FlowConfig, values, "flow")


def _hift_config(node: TaggedNode) -> HiFTConfig:
    _expect(node, "hift", "hift")
    kw = dict(node.kwargs)
    if "f0_predictor" in kw:
        f0 = kw["f0_predictor"]
        _expect(f0, "hift.f0_predictor", "conv_rnn_f0_predictor")
        kw["f0_predictor"] = dict(f0.kwargs)
    try:
        return HiFTConfig.from_yaml_kwargs(kw)
    except ModelError:
        raise
    except (TypeError, ValueError, KeyError) as exc:
        raise ModelError(f"cosyvoice.yaml: hift: {exc}") from None


def parse_decoder_config(text: str) -> DecoderConfig:
    """The :class:`DecoderConfig` described by the text of a ``cosyvoice.yaml``.

    Raises:
        ModelError: the YAML is malformed, a key is missing, a class is unknown, or a value is
            outside what this implementation supports (the message names the entry).
    """
    try:
        raw = yaml.load(text, Loader=_TaggedLoader)  # noqa: S506 -- a SafeLoader subclass
    except yaml.YAMLError as exc:
        raise ModelError(f"cosyvoice.yaml is not valid YAML: {exc}") from None
    if not isinstance(raw, Mapping):
        raise ModelError("cosyvoice.yaml must be a mapping at the top level")
    missing = [k for k in ("mel_conf", "flow", "hift") if k not in raw]
    if missing:
        raise ModelError(f"cosyvoice.yaml has no {', '.join(missing)} entr{'y' if len(missing) == 1 else 'ies'}")
    resolved = {k: _resolve(raw[k], raw) for k in ("mel_conf", "flow", "hift")}
    if not isinstance(resolved["mel_conf"], Mapping):
        raise ModelError("cosyvoice.yaml: mel_conf must be a mapping")
    try:
        mel = MelConfig.from_yaml_kwargs(resolved["mel_conf"])
    except ModelError:
        raise
    except (TypeError, ValueError, KeyError) as exc:
        raise ModelError(f"cosyvoice.yaml: mel_conf: {exc}") from None
    return DecoderConfig(mel=mel, flow=_flow_config(resolved["flow"]), hift=_hift_config(resolved["hift"]))


def load_decoder_config(path: str | Path) -> DecoderConfig:
    """:func:`parse_decoder_config` of the file at ``path``.

    Raises:
        ModelError: the file is missing or unreadable, or see :func:`parse_decoder_config`.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:  # a binary or corrupt file is not UTF-8
        raise ModelError(f"cannot read the decoder config {path}: {getattr(exc, 'strerror', None) or exc}") from None
    return parse_decoder_config(text)
