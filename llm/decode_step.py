"""The native backend's decode call: one id per row, at a static shape, replayed as a CUDA graph on CUDA.

Owns: ``DecodeStep``, which runs ``Step1ForCausalLM`` on one new id per row with the rows padded to a
power-of-two bucket and the keys read rounded up to a multiple of ``width_step``, from device buffers
that are refilled (one host-to-device copy) each step. On CUDA each (rows, keys) bucket is captured once
as a CUDA graph (all graphs share one memory pool) and replayed: one launch per step instead of about a
thousand kernels, and nothing in the step waits for the host.
Does not own: the model maths (``llm/step1.py``), sampling and scheduling (``llm/native.py``).

Padding rows carry position -1: they write only their slot's scratch position and their logits are
dropped, so a row's logits do not depend on its bucket (checked by the tests on CPU, where the same
static shapes run without capture).
"""

from __future__ import annotations

import logging
import math
from typing import Sequence

import torch

from llm.step1 import KVCache, Step1ForCausalLM

log = logging.getLogger(__name__)


def row_bucket(rows: int, max_rows: int) -> int:
    """The padded row count for ``rows``: the next power of two, at most ``max_rows``."""
    return min(max_rows, 1 << max(0, math.ceil(math.log2(rows))))


class DecodeStep:
    """Decode calls of ``model`` on ``cache`` (see the module docstring).

    Parameters:
        graphs: capture CUDA graphs (default: when the model is on CUDA).
        width_step: keys read are rounded up to a multiple of this (fewer distinct shapes, fewer graphs).
    """

    def __init__(self, model: Step1ForCausalLM, cache: KVCache, *, graphs: bool | None = None,
                 width_step: int = 512) -> None:
        self.model, self.cache = model, cache
        self.device = model.lm_head.weight.device
        self.graphs = (self.device.type == "cuda") if graphs is None else graphs
        if self.graphs and self.device.type != "cuda":
            raise ValueError("CUDA graphs need the model on a CUDA device")
        self.width_step = width_step
        self._buffers: dict[int, torch.Tensor] = {}
        self._captured: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._pool = None

    @property
    def captured(self) -> int:
        """How many (rows, keys) shapes have a CUDA graph."""
        return len(self._captured)

    def width(self, longest: int) -> int:
        """Keys read for rows whose largest position is ``longest - 1``."""
        return min(self.cache.max_len, -(-longest // self.width_step) * self.width_step)

    def __call__(self, ids: Sequence[int], positions: Sequence[int], slots: Sequence[int]) -> torch.Tensor:
        """Logits [len(ids), V] for one new id per row (row b: id ``ids[b]`` at ``positions[b]`` in slot
        ``slots[b]``); valid until the next call."""
        n = len(ids)
        rows = row_bucket(n, self.cache.slots)
        width = self.width(max(positions) + 1)
        pad = rows - n
        host = torch.tensor([list(ids) + [0] * pad, list(positions) + [-1] * pad, list(slots) + [slots[0]] * pad])
        if rows not in self._buffers:
            self._buffers[rows] = torch.zeros(3, rows, dtype=torch.long, device=self.device)
        buf = self._buffers[rows]
        buf.copy_(host.pin_memory() if self.device.type == "cuda" else host, non_blocking=True)
        if not self.graphs:
            return self._run(buf, width)[:n]
        key = (rows, width)
        if key not in self._captured:
            try:
                self._captured[key] = self._capture(buf, width)
            except Exception as exc:  # noqa: BLE001 -- a failed capture costs speed, never answers
                log.warning("CUDA graph capture failed (%s: %s); decode steps run eagerly from now on",
                            type(exc).__name__, exc)
                self.graphs = False
                return self._run(buf, width)[:n]
            log.info("captured a CUDA graph for decode steps of %d rows x %d keys (%d graphs)", rows, width,
                     len(self._captured))
        graph, out = self._captured[key]
        graph.replay()
        return out[:n]

    def _run(self, buf: torch.Tensor, width: int) -> torch.Tensor:
        ids, positions, slots = buf[0][:, None], buf[1][:, None], buf[2]
        return self.model(ids, positions, self.cache, slots, logits_at=torch.zeros_like(slots), width=width)

    def _capture(self, buf: torch.Tensor, width: int):
        # Warm-up on a side stream (allocator, cuBLAS workspaces), as CUDA graph capture requires. It writes
        # the same keys/values at the same positions as the replay that follows, so the cache is unchanged.
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            self._run(buf, width)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            out = self._run(buf, width)
        self._pool = graph.pool()
        return graph, out
