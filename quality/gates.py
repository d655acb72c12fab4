"""Per-request gates: which checks run, the thresholds, best-of-N candidates and retries.

Owns: ``Gates`` (the request's choices, validated), ``best_take`` (the stated rule) and
``generate_gated``, which makes the takes, scores them and returns the best.
Does not own: making one take (the caller's ``make_take``: an engine call), scoring (``quality.report``).

Candidates: the N takes of a round are started together, each on its own thread, with seeds
``seed, seed+1, ..., seed+N-1`` (folded into [0, 2**31)); the engine's LLM backend batches
concurrent requests (continuous batching), so they decode as one batch rather than one after another.
Retries: when no take of a round passes the gates, another round of N runs with the next N seeds, at
most ``retries`` times; the best take of all rounds is returned (it may still be below the gates: its
report says so, the caller decides what to show).

The rule for "best", in order: a take that passes the gates beats one that does not; then the lower
content error; then the higher speaker similarity; then fewer signal flags; then the earlier seed.
A score that could not be measured (e.g. the recogniser failed on one take) ranks below a measured one.
"""

from __future__ import annotations

import logging
import math
import secrets
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Generic, Sequence, TypeVar

from core.audio_io import Audio
from core.errors import InputError
from quality.report import CHECKS, QualityReport, QualityScorer
from quality.speaker import SpeakerReference

log = logging.getLogger(__name__)
T = TypeVar("T")

MAX_CANDIDATES = 8    # one LLM batch of takes; more costs memory for little gain
MAX_RETRIES = 3


@dataclass(frozen=True)
class Gates:
    """One request's quality choices. A threshold turns its check on; ``signal`` is on by default.

    Raises (on construction):
        InputError: an unknown check, a threshold out of range, candidates or retries out of range.
    """

    checks: frozenset[str] = frozenset({"signal"})
    max_error: float | None = None        # content error (CER/WER) above this fails the take
    min_similarity: float | None = None   # speaker similarity below this fails the take
    candidates: int = 1
    retries: int = 0

    def __post_init__(self) -> None:
        unknown = set(self.checks) - set(CHECKS)
        if unknown:
            raise InputError(f"unknown quality check(s) {', '.join(sorted(unknown))}; choose from {', '.join(CHECKS)}")
        if self.max_error is not None and not (math.isfinite(self.max_error) and 0.0 <= self.max_error <= 1.0):
            raise InputError(f"max_error must be between 0 and 1, not {self.max_error}")
        if self.min_similarity is not None and not (math.isfinite(self.min_similarity)
                                                    and -1.0 <= self.min_similarity <= 1.0):
            raise InputError(f"min_similarity must be between -1 and 1, not {self.min_similarity}")
        for name, value, top in (("candidates", self.candidates, MAX_CANDIDATES), ("retries", self.retries, MAX_RETRIES)):
            low = 1 if name == "candidates" else 0
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= top:
                raise InputError(f"{name} must be a whole number from {low} to {top}, not {value!r}")
        checks = set(self.checks)
        if self.max_error is not None:
            checks.add("content")
        if self.min_similarity is not None:
            checks.add("speaker")
        object.__setattr__(self, "checks", frozenset(checks))

    @property
    def takes_at_most(self) -> int:
        return self.candidates * (self.retries + 1)

    @property
    def active(self) -> bool:
        """Whether anything is scored at all."""
        return bool(self.checks)


def _rank(report: QualityReport, order: int) -> tuple:
    """Larger is better (see the module docstring)."""
    error, similarity = report.error, report.similarity
    return (report.passed, -error if error is not None else -math.inf,
            similarity if similarity is not None else -math.inf, -len(report.flags), -order)


def best_take(reports: Sequence[QualityReport]) -> int:
    """The index of the best report by the stated rule (the first of equals)."""
    if not reports:
        raise ValueError("no takes to choose from")
    return max(range(len(reports)), key=lambda i: _rank(reports[i], i))


@dataclass(frozen=True)
class GatedTake(Generic[T]):
    """What ``generate_gated`` returns: the chosen take, its report, and every take's report in order."""

    take: T
    report: QualityReport
    reports: tuple[QualityReport, ...]
    rounds: int

    def header(self) -> str:
        return self.report.header(takes=len(self.reports), rounds=self.rounds)

    def as_dict(self) -> dict:
        return {**self.report.as_dict(), "takes": len(self.reports), "rounds": self.rounds,
                "all_takes": [{"seed": r.seed, "passed": r.passed, "error": r.error, "similarity": r.similarity,
                               "flags": list(r.flags)} for r in self.reports]}


def generate_gated(make_take: Callable[[int], T], audio_of: Callable[[T], Audio], text: str, gates: Gates,
                   scorer: QualityScorer, reference: SpeakerReference | None = None,
                   seed: int | None = None) -> GatedTake[T]:
    """Make takes (``make_take(seed)``, N at once per round), score each, return the best.

    Parameters:
        make_take: one engine call for a seed; must be thread-safe (engines are).
        audio_of: the audio of a take (e.g. ``lambda r: r.audio``).
        text: what every take should say.
        seed: the first take's seed (None or negative: random).

    Raises:
        What ``make_take`` raises (the round's other takes finish first; their work is discarded).
    """
    base = secrets.randbelow(2**31) if seed is None or seed < 0 else int(seed) % 2**31
    reference = reference if reference is not None else scorer.reference(None)
    takes: list = []
    reports: list[QualityReport] = []
    rounds = 0
    for round_index in range(gates.retries + 1):
        rounds += 1
        seeds = [(base + round_index * gates.candidates + i) % 2**31 for i in range(gates.candidates)]
        if gates.candidates == 1:
            batch = [make_take(seeds[0])]
        else:
            # Together, so the engine's batcher decodes them side by side.
            with ThreadPoolExecutor(max_workers=gates.candidates, thread_name_prefix="candidate") as pool:
                batch = list(pool.map(make_take, seeds))
        for take, take_seed in zip(batch, seeds):
            takes.append(take)
            reports.append(scorer.score(audio_of(take), text, gates.checks, reference, max_error=gates.max_error,
                                        min_similarity=gates.min_similarity, seed=take_seed))
        if any(r.passed for r in reports[-len(batch):]):
            break
        if round_index < gates.retries:
            log.info("quality gates: no take of round %d passed (%s); retrying", rounds,
                     "; ".join(reports[-1].failed))
    chosen = best_take(reports)
    return GatedTake(takes[chosen], reports[chosen], tuple(reports), rounds)
