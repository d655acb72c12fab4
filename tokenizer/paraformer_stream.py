"""The streaming Paraformer encoder behind Step-Audio's vq02 tokens, driven through public funasr.

Owns: finding the files of the FunASR model folder (``configuration.json`` / ``config.yaml`` /
weights / ``am.mvn`` / token list), building the model with ``funasr.AutoModel`` from that local
folder (offline, no hub, no remote code), loading its weights from ``model.safetensors`` or
``model.pt`` with the shared strict rules of ``core.checkpoint``, and running the reference's
streaming encoder over a whole 16 kHz clip, either through funasr's chunk-by-chunk loop
(``streaming``, the reference) or all chunks per layer at once (``parallel``,
``parallel_encoder``; the same output).
Does not own: audio preprocessing, k-means assignment (``tokenizer.step_audio``), caching
(``tts_engine.prompt_bundle``), the checkpoint rules (``core.checkpoint``).

Shape legend:
    N   samples at 16 kHz
    T   LFR frames, one per 60 ms (16.67 Hz)
    F   LFR feature size (80 mel bins x lfr_m 7 = 560)
    D   encoder output size (512 for the real model)

Streaming loop (pipeline.md §1.2): chunk_size [0, 4, 5], i.e. a stride of 4 LFR frames =
3840 samples = 240 ms; encoder look-back 4 chunks; ``len // 3840 + 1`` chunks with only the last
marked final; of each chunk's encoder output only the new frames (the last ``lens`` frames) are
kept. Edge cases follow the reference's ``infer_encoder``: an empty final chunk ends the loop, and
a final chunk under 480 samples whose fbank fails is skipped.

Deliberate deviations from the reference: the frontend's ``dither`` is forced to 0.0 (the
reference's funasr default of 1.0 makes tokens random from run to run); the model's decoder,
predictor and CTC head are dropped after the strict load, since only the encoder runs; the
in-memory WAV round trip the reference does before FunASR is skipped (it is lossless).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import random
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import yaml

from core.checkpoint import find_weights, load_state_dict_file, load_strict
from core.errors import ModelError
from core.settings import VQ02_ENCODERS as ENCODER_MODES
from tokenizer.parallel_encoder import check_supported, encode_parallel

log = logging.getLogger(__name__)

CHUNK_SIZE = (0, 4, 5)            # [left context, stride, right context] in LFR frames
ENCODER_LOOK_BACK = 4             # chunks of K/V cache each SANM layer keeps
DECODER_LOOK_BACK = 1             # unused by the encoder; passed as the reference does
CHUNK_STRIDE = CHUNK_SIZE[1] * 960  # 3840 samples = 240 ms at 16 kHz
MIN_FINAL_CHUNK = 480             # 30 ms: a shorter final chunk may be skipped
UNUSED_HEADS = ("decoder", "predictor", "ctc")


@dataclass(frozen=True)
class ParaformerFiles:
    """The files of one FunASR model folder that the encoder depends on."""

    folder: Path
    config: Path
    weights: Path
    cmvn: Path
    tokens: Path

    def all(self) -> tuple[Path, ...]:
        return (self.config, self.weights, self.cmvn, self.tokens)


@dataclass(frozen=True)
class StreamOutput:
    """Encoder output of one clip.

    ``enc_out`` is ``[T, D]`` float32 on the model's device; ``chunk_lengths`` the new LFR frames
    of each chunk; ``chunk_inputs`` the ``[T, F]`` encoder inputs (fbank -> LFR -> CMVN) on the CPU
    when they were asked for, else None.
    """

    enc_out: torch.Tensor
    chunk_lengths: tuple[int, ...]
    chunk_inputs: torch.Tensor | None = None


def locate_files(folder: Path) -> ParaformerFiles:
    """Resolve the model files of ``folder``, using its ``configuration.json`` when present.

    Raises:
        ModelError: the folder or one of its files is missing (the message names it).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ModelError(f"FunASR model folder not found: {folder}")
    names = {"config": "config.yaml", "init_param": "model.pt", "cmvn": "am.mvn", "tokens": None}
    meta_path = folder / "configuration.json"
    if meta_path.is_file():
        try:
            metas = json.loads(meta_path.read_text(encoding="utf-8")).get("file_path_metas") or {}
            names["config"] = metas.get("config", names["config"])
            names["init_param"] = metas.get("init_param", names["init_param"])
            names["cmvn"] = (metas.get("frontend_conf") or {}).get("cmvn_file", names["cmvn"])
            names["tokens"] = (metas.get("tokenizer_conf") or {}).get("token_list")
        except (ValueError, OSError) as exc:  # UnicodeDecodeError is a ValueError
            raise ModelError(f"{meta_path} is not valid JSON: {exc}") from None
        except AttributeError:  # a list or string where a mapping belongs
            raise ModelError(f"{meta_path} does not map file_path_metas to file names") from None
        if not all(isinstance(v, str) for v in names.values() if v is not None):
            raise ModelError(f"{meta_path} does not map file_path_metas to file names")

    def need(name: str) -> Path:
        path = folder / name
        if not path.is_file():
            raise ModelError(f"the FunASR model folder {folder} lacks {name}")
        return path

    found = find_weights(folder, "model", names["init_param"])   # the shared rule: safetensors first
    token_names = [names["tokens"]] if names["tokens"] else ["tokens.json", "tokens.txt"]
    token_file = next((folder / n for n in token_names if (folder / n).is_file()), None)
    if token_file is None:
        raise ModelError(f"the FunASR model folder {folder} lacks {' or '.join(token_names)}")
    return ParaformerFiles(folder, need(names["config"]), found, need(names["cmvn"]), token_file)


@contextlib.contextmanager
def _quiet_and_seed_neutral(device: torch.device) -> Iterator[None]:
    """Keep funasr's import/build side effects out of the process.

    Importing funasr prints notices and configures the root logger; ``AutoModel`` calls
    ``set_all_random_seed(0)`` and initialises weights from the global torch RNG. The caller's
    random state and logging must not depend on whether a model was loaded.
    """
    py_state, np_state = random.getstate(), np.random.get_state()
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level  # importing funasr installs a root handler at INFO
    out = io.StringIO()
    cuda_devices = list(range(torch.cuda.device_count())) if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda_devices), warnings.catch_warnings(), contextlib.redirect_stdout(out):
        warnings.simplefilter("ignore")
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)
            root.handlers[:] = handlers
            root.setLevel(level)
    if out.getvalue().strip():
        log.debug("funasr said: %s", out.getvalue().strip().replace("\n", " | "))


def build_auto_model(folder: Path, device: torch.device):
    """``(funasr.AutoModel, ParaformerFiles)`` for ``folder``: built offline from its config (no hub,
    no remote code), weights loaded strictly from ``model.safetensors`` or ``model.pt``, in eval
    mode on ``device``. Every head stays; :class:`ParaformerStream` drops those it does not run,
    ``tokenizer.asr`` keeps them all.

    Raises:
        ModelError: missing files, a config funasr cannot build, or weights that do not match.
    """
    files = locate_files(folder)
    try:
        conf = yaml.safe_load(files.config.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError, OSError) as exc:
        raise ModelError(f"{files.config} is not readable YAML: {exc}") from None
    if not isinstance(conf, dict) or "model" not in conf or not isinstance(conf.get("encoder_conf"), dict):
        raise ModelError(f"{files.config} does not describe a FunASR model (no model/encoder_conf)")
    for section in ("model_conf", "tokenizer_conf", "frontend_conf"):
        if not isinstance(conf.get(section) or {}, dict):
            raise ModelError(f"{files.config}: {section} must be a mapping")
    conf.setdefault("model_conf", {})  # present => AutoModel skips its hub/download resolution
    conf["tokenizer_conf"] = {**(conf.get("tokenizer_conf") or {}), "token_list": str(files.tokens)}
    conf["frontend_conf"] = {**(conf.get("frontend_conf") or {}), "cmvn_file": str(files.cmvn), "dither": 0.0}
    with _quiet_and_seed_neutral(device):
        try:
            from funasr import AutoModel
            # init_param None: weights are loaded strictly below, from .safetensors or .pt.
            auto = AutoModel(**{**conf, "model_path": str(files.folder), "device": str(device),
                                "disable_update": True, "disable_pbar": True, "trust_remote_code": False,
                                "init_param": None,
                                "ncpu": torch.get_num_threads(),  # else AutoModel resets the process's threads
                                "log_level": logging.getLevelName(logging.getLogger().getEffectiveLevel())})
        except Exception as exc:  # noqa: BLE001 - funasr raises many kinds; the user needs one
            raise ModelError(f"funasr could not build the model in {files.folder}: {exc}") from None
    load_strict(auto.model, load_state_dict_file(files.weights), f"the Paraformer ({files.weights.name})")
    auto.model.to(device).eval()
    return auto, files


class ParaformerStream:
    """A loaded FunASR streaming Paraformer; :meth:`encode` is thread-safe (one clip at a time)."""

    def __init__(self, model: torch.nn.Module, kwargs: dict, files: ParaformerFiles, device: torch.device,
                 encoder_mode: str = "parallel") -> None:
        if encoder_mode not in ENCODER_MODES:
            raise ValueError(f"encoder_mode must be one of {', '.join(ENCODER_MODES)}, not {encoder_mode!r}")
        if encoder_mode == "parallel":
            try:
                check_supported(model.encoder)
            except ValueError as exc:
                raise ModelError(f"{exc}; use --vq02-encoder streaming for this model") from None
        self.encoder_mode = encoder_mode  # the path encode() takes unless told otherwise
        self.model = model
        self.frontend = kwargs["frontend"]
        self.files = files
        self.device = device
        self.output_size = int(kwargs["encoder_conf"]["output_size"])
        self._cache_conf = {"encoder_conf": kwargs["encoder_conf"], "frontend_conf": kwargs["frontend_conf"]}
        # The streaming cache is per call, but the frontend and model are shared: serialise.
        self._lock = threading.Lock()

    @classmethod
    def load(cls, folder: Path, device: str | torch.device = "cpu", encoder_mode: str = "parallel") -> "ParaformerStream":
        """Build the model of ``folder`` with ``funasr.AutoModel`` and load its weights strictly.

        Raises:
            ModelError: missing files, a config funasr cannot build, or weights that do not match.
        """
        device = torch.device(device)
        auto, files = build_auto_model(folder, device)
        model = auto.model
        for head in UNUSED_HEADS:
            if getattr(model, head, None) is not None:
                setattr(model, head, None)
        model.to(device).eval()
        log.info("Paraformer encoder %s loaded from %s (%s) on %s", type(model).__name__, files.folder.name,
                 files.weights.name, device)
        return cls(model, auto.kwargs, files, device, encoder_mode)

    def encode(self, wav: np.ndarray, keep_inputs: bool = False, mode: str | None = None) -> StreamOutput:
        """Run the streaming encoder over a whole clip.

        Parameters:
            wav: ``[N]`` float32 at 16 kHz, already preprocessed (peak 0.999, trimmed).
            keep_inputs: also return the per-chunk encoder inputs (for parity checks).
            mode: ``parallel`` (all chunks per layer at once) or ``streaming`` (funasr's chunk-by-chunk
                loop, the reference); None uses :attr:`encoder_mode`. Both give the same output.
        Returns:
            :class:`StreamOutput` with ``enc_out`` ``[T, D]``.
        Raises:
            ModelError: a non-final chunk failed in the frontend, the encoder failed, or nothing was
                encoded.
        """
        mode = mode or self.encoder_mode
        if mode not in ENCODER_MODES:
            raise ValueError(f"mode must be one of {', '.join(ENCODER_MODES)}, not {mode!r}")
        samples = torch.from_numpy(np.ascontiguousarray(wav, dtype=np.float32))
        with self._lock, torch.inference_mode():
            cache: dict = {}
            self.model.init_cache(cache, chunk_size=list(CHUNK_SIZE), encoder_chunk_look_back=ENCODER_LOOK_BACK,
                                  decoder_chunk_look_back=DECODER_LOOK_BACK, **self._cache_conf)
            chunks = self._features(samples, cache)
            if not chunks:
                raise ModelError("the Paraformer encoder produced no frames")
            inputs = torch.cat([c.cpu() for c in chunks], 0) if keep_inputs else None
            lengths = tuple(len(c) for c in chunks)
            if mode == "parallel":
                try:
                    enc = encode_parallel(self.model.encoder, chunks, CHUNK_SIZE, ENCODER_LOOK_BACK)
                except RuntimeError as exc:  # e.g. out of memory on the device
                    raise ModelError(f"the Paraformer encoder failed on a {len(samples) / 16000:.2f} s clip: "
                                     f"{exc}") from None
            else:
                enc = self._encode_streaming(chunks, cache)
        return StreamOutput(enc.float(), lengths, inputs)

    def _features(self, samples: torch.Tensor, cache: dict) -> list[torch.Tensor]:
        """The frontend, chunk by chunk: ``[n_i, F]`` encoder inputs per chunk (its own streaming state)."""
        from funasr.utils.load_utils import extract_fbank

        n_chunks = len(samples) // CHUNK_STRIDE + 1
        chunks = []
        for i in range(n_chunks):
            final = i == n_chunks - 1
            chunk = samples[i * CHUNK_STRIDE:(i + 1) * CHUNK_STRIDE]
            if final and len(chunk) == 0:
                break
            try:
                speech, _ = extract_fbank([chunk], data_type="sound", frontend=self.frontend,
                                          cache=cache["frontend"], is_final=final)
            except Exception as exc:  # noqa: BLE001
                if final and len(chunk) < MIN_FINAL_CHUNK:
                    log.debug("skipped a %d-sample final chunk the frontend could not frame", len(chunk))
                    break
                raise ModelError(f"the Paraformer frontend failed on chunk {i}: {exc}") from None
            if speech.dim() != 3:  # the frontend's "not enough samples yet" answer
                if final:
                    break
                raise ModelError(f"the Paraformer frontend gave no frames for chunk {i}")
            chunks.append(speech[0])
        return chunks

    def _encode_streaming(self, chunks: list[torch.Tensor], cache: dict) -> torch.Tensor:
        """funasr's own chunk-by-chunk loop; of each chunk only the new frames are kept."""
        outs = []
        for i, speech in enumerate(chunks):
            new = len(speech)
            lens = torch.tensor([new], dtype=torch.int32, device=self.device)
            try:
                enc, _ = self.model.encode_chunk(speech[None].to(self.device), lens, cache=cache,
                                                 is_final=i == len(chunks) - 1)
            except RuntimeError as exc:  # e.g. out of memory on the device
                raise ModelError(f"the Paraformer encoder failed on chunk {i}: {exc}") from None
            outs.append(enc[0, -new:] if new else enc[0])  # -0 would keep everything; so does the reference
        return torch.cat(outs, 0)

