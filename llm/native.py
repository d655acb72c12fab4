"""Our own Step1 decode loop with iteration-level (continuous) batching.

Owns: ``NativeBackend``, an :class:`llm.backend.LLMBackend` that runs the plain-torch Step1
(``llm/step1.py``) on one worker thread: requests wait in a queue, join the running rows between
decode steps (their prompts prefilled in chunks under a per-step token budget), sample with the
reference's rules (``llm/sampling.py``) and a generator seeded per request, stream every answer
id as it is sampled, and leave the batch the step they finish (their stream finishes at once and
their KV-cache slot is reused). A cancelled stream's row is dropped at the next step.
Does not own: the model maths (``llm/step1.py``), weights and tokenizer files (``llm/checkpoint.py``,
``llm/text_tokenizer.py``), what the ids mean (``llm/sampling.py`` filters them for the engine).

One step of the worker:
    1. admit queued requests while fewer than ``max_rows`` rows run (``join_running=False`` gives
       the old static batching: admit only when no row runs; benchmarks use it as the baseline);
    2. drop cancelled rows;
    3. prefill: the rows whose prompt is not yet in the cache get chunks of it, in arrival order,
       in one padded call, with at most ``step_token_budget - (rows decoding)`` prompt ids; a row whose
       prompt is complete samples its first id from that call;
    4. decode: one call over every other running row (one id each), then one sampled id per row.

Rows never see each other: each has its own cache slot (zeroed when the row takes it) and positions
(``llm/step1.py``), its own seeded generator and its own budget, so a request's answer does not depend
on what it ran with (up to float round-off between call shapes).

The device is waited for once per step: the sampled ids are copied to the host. Decode calls run at a
static shape per row bucket (``llm/decode_step.py``, CUDA graphs on CUDA), prefill calls get their
key width from the host, and the draw is done on the device with the row's own CPU generator's numbers
(the same ids a CPU ``torch.multinomial`` gave).
"""

from __future__ import annotations

import collections
import json
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from core.errors import InputError, ModelError
from llm.backend import GenerationOutput, GenerationRequest, GenerationStream, LLMBackend
from llm.checkpoint import load_step1
from llm.decode_step import DecodeStep
from llm.quantize import check_quantization, quantize_step1
from llm.sampling import SamplingConfig, repetition_ban, slot_allowed, top_candidates
from llm.step1 import Step1Config, Step1ForCausalLM
from llm.text_tokenizer import TextTokenizer, load_text_tokenizer

log = logging.getLogger(__name__)


@dataclass(eq=False)
class _Row:
    stream: GenerationStream
    prompt: list[int]
    budget: int                          # most answer ids
    generator: torch.Generator
    submitted: float
    recent: collections.deque            # last ``repetition_window`` ids (prompt, then answer)
    slot: int = -1
    filled: int = 0                      # prompt ids already in the cache
    answer: list[int] = field(default_factory=list)
    started: float = 0.0                 # first prefill call
    first: float = 0.0                   # first id sampled
    last: float = 0.0
    sampling_s: float = 0.0
    batch_size: int = 1
    steps: int = 0

    @property
    def decoding(self) -> bool:
        return self.filled == len(self.prompt)


class NativeBackend(LLMBackend):
    """Runs Step1 with continuous batching on a worker thread (see the module docstring).

    Parameters:
        model: a loaded Step1 in eval mode (its device and dtype are used).
        tokenizer: the folder's text tokenizer.
        sampling: temperature, top-k/top-p, budgets, repetition window, slot mask.
        eos_ids: ids that end an answer; the first is forced when a budget runs out.
        max_rows: most requests decoded together (each holds one KV-cache slot).
        step_token_budget: most tokens one step runs: one per decoding row, the rest prompt ids.
        join_running: False gives static batching (new requests wait until the batch is empty).
        start: start the worker now (False: call :meth:`start`; tests queue requests first).
        graphs: replay decode steps as CUDA graphs (default: on CUDA; ``llm/decode_step.py``).

    Raises:
        ValueError: ``max_rows`` < 1 or ``step_token_budget`` <= ``max_rows``.
    """

    name = "native"
    quantization = "none"     # what from_folder applied (llm/quantize.py); shown by describe()

    def __init__(self, model: Step1ForCausalLM, tokenizer: TextTokenizer | None, sampling: SamplingConfig,
                 eos_ids: Sequence[int], *, max_rows: int = 8, step_token_budget: int = 512,
                 join_running: bool = True, start: bool = True, graphs: bool | None = None) -> None:
        if max_rows < 1 or step_token_budget <= max_rows:
            raise ValueError(f"need max_rows >= 1 and step_token_budget > max_rows, not {max_rows}, "
                             f"{step_token_budget}")
        if not eos_ids:
            raise ValueError("at least one end-of-answer id is needed")
        self.model, self.tokenizer, self.sampling = model, tokenizer, sampling
        self._eos_ids = tuple(int(i) for i in eos_ids)
        self.max_rows, self.step_token_budget, self.join_running = max_rows, step_token_budget, join_running
        weight = model.lm_head.weight
        self.device = weight.device
        self.cache = model.new_cache(max_rows, sampling.max_length)
        self._step = DecodeStep(model, self.cache, graphs=graphs)
        self.close_timeout_s = 30.0
        self._free = list(range(max_rows))
        self._queue: collections.deque[_Row] = collections.deque()
        self._rows: list[_Row] = []
        self._cond = threading.Condition()
        self._closed = False
        self._masks: dict[bool, torch.Tensor] = {}
        self._counts = {"steps": 0, "tokens_generated": 0, "requests_finished": 0, "requests_failed": 0,
                        "requests_cancelled": 0}
        self._thread = threading.Thread(target=self._work, name="llm-native", daemon=True)
        if start:
            self.start()
        log.info("native LLM backend: up to %d rows, %d tokens per step, KV cache %.0f MB (%d positions per row)%s",
                 max_rows, step_token_budget, self.cache.bytes / 2**20, sampling.max_length,
                 "" if join_running else ", static batching")

    @classmethod
    def from_folder(cls, folder: Path | str, device: torch.device | str, dtype: torch.dtype, *,
                    max_new_tokens: int = 0, slot_mask: bool = True, max_rows: int = 8,
                    step_token_budget: int = 512, quantization: str = "none") -> "NativeBackend":
        """Load ``Step-Audio-EditX/``: Step1 weights, tokenizer, and top-k/top-p/EOS from
        ``generation_config.json`` when present (read as data). ``quantization`` (``llm/quantize.py``)
        is applied after the strict load.

        Raises:
            ModelError: a file is missing or does not load (the message names it); the quantization
                cannot run on ``device``/``dtype`` (checked before loading).
        """
        folder = Path(folder)
        check_quantization(quantization, device, dtype)
        model = quantize_step1(load_step1(folder, device, dtype), quantization)
        tokenizer, sampling, eos_ids = answer_rules(folder, model.config, max_new_tokens=max_new_tokens,
                                                    slot_mask=slot_mask)
        backend = cls(model, tokenizer, sampling, eos_ids, max_rows=max_rows, step_token_budget=step_token_budget)
        backend.quantization = quantization
        return backend

    # ------------------------------------------------------------------ contract

    def start(self) -> None:
        """Start the worker (once)."""
        if not self._thread.is_alive() and not self._closed:
            self._thread.start()

    def submit(self, request: GenerationRequest, stream: GenerationStream | None = None) -> GenerationStream:
        """Queue ``request``; ``stream`` lets a caller pass its own (sub)class of stream.

        Raises:
            InputError: the prompt is empty or leaves no room for an answer within ``max_length``.
            ModelError: the backend is closed.
        """
        n = len(request.prompt_ids)
        limit = self.sampling.max_length
        if n == 0:
            raise InputError("the LLM prompt is empty")
        if n >= limit - 5:   # room for at least one 5-id audio group
            raise InputError(f"the prompt clip and text make {n} LLM tokens; the model's limit is {limit} "
                             "including the answer. Use a shorter clip or text.")
        if request.max_new_tokens is not None and request.max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be at least 1, not {request.max_new_tokens}")
        budget = self.sampling.budget(n)
        if request.max_new_tokens is not None:
            budget = min(budget, request.max_new_tokens)
        stream = stream if stream is not None else GenerationStream(request)
        generator = torch.Generator(device="cpu")   # CPU draws: the same ids on any device
        generator.manual_seed(int(request.seed))
        window = self.sampling.repetition_window
        row = _Row(stream, list(request.prompt_ids), budget, generator, time.perf_counter(),
                   collections.deque(request.prompt_ids[-window:], maxlen=window))
        with self._cond:
            if self._closed:
                raise ModelError("the LLM backend is closed")
            self._queue.append(row)
            self._cond.notify()
        return stream

    def encode(self, text: str) -> list[int]:
        if self.tokenizer is None:
            raise ModelError("this LLM backend was built without a tokenizer")
        return self.tokenizer.encode(text)

    @property
    def eos_ids(self) -> tuple[int, ...]:
        return self._eos_ids

    def ready(self) -> tuple[bool, str]:
        if self._closed:
            return False, "the LLM backend is closed"
        if not self._thread.is_alive():
            return False, "the LLM worker is not running"
        return True, "ok"

    def stats(self) -> dict[str, float]:
        with self._cond:
            running, queued = len(self._rows), len(self._queue)
        return {"rows_running": float(running), "queue_depth": float(queued), "max_rows": float(self.max_rows),
                **{k: float(v) for k, v in self._counts.items()}}

    def describe(self) -> str:
        quantized = "" if self.quantization == "none" else f", {self.quantization} weight-only decoder layers"
        return (f"Step1 (native), {self.model.parameters_count / 1e6:.0f} M parameters{quantized}, up to "
                f"{self.max_rows} rows per step")

    def close(self) -> None:
        """Stop the worker. Requests still queued fail here; running rows fail in the worker when it leaves
        its current step (never from this thread while the worker may still be writing to them)."""
        with self._cond:
            self._closed = True
            queued = list(self._queue)
            self._queue.clear()
            self._cond.notify_all()
        for row in queued:
            if not row.stream.done:
                row.stream.fail(RuntimeError("the LLM backend was closed"))
        if self._thread.is_alive():
            self._thread.join(self.close_timeout_s)
            if self._thread.is_alive():
                log.warning("the LLM worker is still inside a step after %.0f s; its rows fail when it leaves it",
                            self.close_timeout_s)

    # ------------------------------------------------------------------ worker

    def _work(self) -> None:
        with torch.inference_mode():
            while self._admit():
                self._drop_cancelled()
                if not self._rows:
                    continue
                self._counts["steps"] += 1
                decoding = [r for r in self._rows if r.decoding]
                self._prefill(self.step_token_budget - len(decoding))
                if decoding:
                    self._decode(decoding)
        self._fail_all(RuntimeError("the LLM backend was closed"))

    def _admit(self) -> bool:
        """Move queued requests into free slots; waits while there is nothing to do. False: closed."""
        admitted = []
        with self._cond:
            while not self._closed and not self._rows and not self._queue:
                self._cond.wait()
            if self._closed:
                return False
            for row in [r for r in self._queue if r.stream.cancelled]:
                self._queue.remove(row)
                self._finish(row, cancelled=True)
            if self.join_running or not self._rows:     # static batching: only into an empty batch
                while self._queue and self._free:
                    row = self._queue.popleft()
                    row.slot = self._free.pop()
                    admitted.append(row)
                    self._rows.append(row)
        for row in admitted:      # outside the lock (submit() waits on it); only this thread runs steps
            self.cache.clear(row.slot)
        return True

    def _drop_cancelled(self) -> None:
        for row in [r for r in self._rows if r.stream.cancelled]:
            self._release(row)
            self._finish(row, cancelled=True)

    def _prefill(self, budget: int) -> None:
        chunks: list[tuple[_Row, int]] = []
        for row in self._rows:
            if row.decoding or budget <= 0:
                continue
            n = min(len(row.prompt) - row.filled, budget)
            chunks.append((row, n))
            budget -= n
        if not chunks:
            return
        now = time.perf_counter()
        width = max(n for _, n in chunks)
        ids = torch.zeros(len(chunks), width, dtype=torch.long)
        pos = torch.full((len(chunks), width), -1, dtype=torch.long)
        for i, (row, n) in enumerate(chunks):
            row.started = row.started or now
            ids[i, :n] = torch.tensor(row.prompt[row.filled:row.filled + n])
            pos[i, :n] = torch.arange(row.filled, row.filled + n)
        rows = [row for row, _ in chunks]
        last = torch.tensor([n - 1 for _, n in chunks])
        logits = self._forward(rows, lambda: self.model(
            ids.to(self.device), pos.to(self.device), self.cache, torch.tensor([r.slot for r in rows]).to(self.device),
            logits_at=last.to(self.device), width=max(row.filled + n for row, n in chunks)))
        if logits is None:
            return
        done = []
        for i, (row, n) in enumerate(chunks):
            row.filled += n
            if row.decoding:
                done.append(i)
        if done:
            self._sample([rows[i] for i in done], logits[done])

    def _decode(self, rows: list[_Row]) -> None:
        # Everything the step needs is known here on the host: nothing in it waits for the device.
        logits = self._forward(rows, lambda: self._step([r.answer[-1] for r in rows],
                                                        [len(r.prompt) + len(r.answer) - 1 for r in rows],
                                                        [r.slot for r in rows]))
        if logits is not None:
            for r in rows:
                r.batch_size = max(r.batch_size, len(rows))
            self._sample(rows, logits)

    def _forward(self, rows: list[_Row], call) -> torch.Tensor | None:
        """``call()``'s logits [B,V] as float32; None when the model failed (rows failed)."""
        try:
            return call().float()
        except Exception as exc:  # noqa: BLE001 -- e.g. out of memory: fail these rows, keep serving
            log.exception("LLM step failed for %d row(s)", len(rows))
            for row in rows:
                self._release(row)
                self._counts["requests_failed"] += 1
                row.stream.fail(exc)
            return None

    def _disallowed(self, vq02: bool, vocab: int) -> torch.Tensor:
        if vq02 not in self._masks:
            self._masks[vq02] = ~slot_allowed(0 if vq02 else 2, vocab, self._eos_ids, self.device)
        return self._masks[vq02]

    def _h2d(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` on the model's device. From pinned memory without blocking: a copy from pageable memory
        would first wait for everything queued on the device (the step's forward)."""
        return t.pin_memory().to(self.device, non_blocking=True) if self.device.type == "cuda" else t

    def _sample(self, rows: list[_Row], scores: torch.Tensor) -> None:
        """One id per row from ``scores`` [B,V] with the reference's processors and the row's generator."""
        start = time.perf_counter()
        cfg, window = self.sampling, self.sampling.repetition_window
        steps = [len(r.answer) for r in rows]
        recent = self._h2d(torch.tensor([[0] * (window - len(r.recent)) + list(r.recent) for r in rows]))
        lengths = self._h2d(torch.tensor([len(r.prompt) + len(r.answer) for r in rows]))
        scores = repetition_ban(recent, scores, window, lengths)
        held = [i for i, s in enumerate(steps) if s < cfg.min_new_tokens]
        if held:
            scores[self._h2d(torch.tensor(held))[:, None], self._h2d(torch.tensor(self._eos_ids))] = float("-inf")
        if cfg.slot_mask:
            vocab = scores.shape[-1]
            mask = torch.stack([self._disallowed(s % 5 < 2, vocab) for s in steps])
            scores = scores.masked_fill(mask, float("-inf"))
        probs, ids = top_candidates(scores / cfg.temperature, cfg.top_k, cfg.top_p)
        # The draw of torch.multinomial(p, 1, generator) on the CPU, done on the device: argmax(p / e) with
        # e ~ Exp(1) from the row's generator (the same numbers, so the same ids as a CPU draw), and one
        # copy to the host per step instead of copying the probabilities.
        noise = torch.stack([torch.empty(probs.shape[-1]).exponential_(1, generator=r.generator) for r in rows])
        drawn = ids.gather(1, (probs / self._h2d(noise)).argmax(dim=-1, keepdim=True))[:, 0]
        drawn = torch.where(torch.isfinite(probs).all(dim=-1), drawn, self._eos_ids[0])  # every id banned: end
        tokens = drawn.tolist()
        now = time.perf_counter()
        for i, row in enumerate(rows):
            token = self._eos_ids[0] if steps[i] >= row.budget else tokens[i]
            row.first = row.first or now
            row.last = now
            row.steps += 1
            row.sampling_s += now - start
            if token in self._eos_ids:
                self._release(row)
                self._finish(row)
                continue
            row.answer.append(token)
            row.recent.append(token)
            row.stream.put(token)
            self._counts["tokens_generated"] += 1
            if len(row.answer) >= row.budget:   # the budget is spent: end now instead of forcing EOS next step
                self._release(row)
                self._finish(row)

    def _release(self, row: _Row) -> None:
        with self._cond:
            if row in self._rows:
                self._rows.remove(row)
                self._free.append(row.slot)

    def _finish(self, row: _Row, cancelled: bool = False) -> None:
        end = row.last or time.perf_counter()
        ms = lambda a, b: max(0.0, (b - a) * 1000.0) if a and b else 0.0  # noqa: E731
        out = GenerationOutput(answer=tuple(row.answer), prefill_ms=ms(row.started, row.first),
                               decode_ms=ms(row.first, end), batch_size=row.batch_size, steps=row.steps,
                               sampling_ms=row.sampling_s * 1000.0,
                               queue_ms=ms(row.submitted, row.started or end), cancelled=cancelled)
        self._counts["requests_cancelled" if cancelled else "requests_finished"] += 1
        row.stream.finish(out)

    def _fail_all(self, error: BaseException) -> None:
        with self._cond:
            pending = list(self._rows) + list(self._queue)
            self._rows.clear()
            self._queue.clear()
        for row in pending:
            if not row.stream.done:
                row.stream.fail(error)


# The one rule for generation_config.json, for both backends: the fields the reference leaves to the file
# (its generate() call sets temperature, do_sample, max_length and its logits processor itself, so
# transformers takes top-k, top-p and the end ids from the file). The studio sends these with every request;
# vLLM is started with ``--generation-config vllm`` so that it applies nothing else from the file.
GENERATION_FIELDS = ("top_k", "top_p", "eos_token_id")
# Fields the reference's explicit arguments override, or that do not change sampling: not worth a warning.
_OVERRIDDEN = {"temperature", "do_sample", "max_length", "max_new_tokens", "bos_token_id", "pad_token_id",
               "transformers_version", "_from_model_config", "use_cache"}


def answer_rules(folder: Path, config: Step1Config, *, max_new_tokens: int = 0,
                 slot_mask: bool = True) -> tuple[TextTokenizer, SamplingConfig, tuple[int, ...]]:
    """What every backend needs from ``Step-Audio-EditX/`` besides the weights: the text tokenizer,
    the sampling config and the ids that end an answer, following ``GENERATION_FIELDS``: top-k/top-p
    from ``generation_config.json`` when present (read as data, transformers' defaults 50 and 1.0
    otherwise); the end ids are the reference's only: the file's ``eos_token_id``, else ``config.json``'s
    (not the tokenizer's own EOS, which the reference's generate() never stops at). Other sampling fields
    in the file are ignored with a warning.

    Raises:
        ModelError: the tokenizer files are missing or unreadable (the message names them).
    """
    tokenizer = load_text_tokenizer(folder)
    top_k, top_p, eos = 50, 1.0, list(config.eos_token_id)
    gen_path = folder / "generation_config.json"
    if gen_path.is_file():
        try:
            gen = json.loads(gen_path.read_text(encoding="utf-8"))
            top_k = int(gen["top_k"]) if gen.get("top_k") is not None else top_k
            top_p = float(gen["top_p"]) if gen.get("top_p") is not None else top_p
            if gen.get("eos_token_id") is not None:
                value = gen["eos_token_id"]
                eos = [int(v) for v in value] if isinstance(value, list) else [int(value)]
            ignored = sorted(set(gen) - set(GENERATION_FIELDS) - _OVERRIDDEN)
            if ignored:
                log.warning("%s: ignoring %s (the studio applies only %s from this file, on both backends)",
                            gen_path, ", ".join(ignored), ", ".join(GENERATION_FIELDS))
        except (OSError, ValueError, TypeError, AttributeError) as exc:
            log.warning("ignoring unreadable %s: %s", gen_path, exc)
    eos_ids = tuple(dict.fromkeys(eos))
    sampling = SamplingConfig(top_k=top_k, top_p=top_p, max_new_tokens=max_new_tokens, slot_mask=slot_mask)
    return tokenizer, sampling, eos_ids
