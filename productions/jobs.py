"""Generation jobs: which segments one "generate" asked for, and how far each has come.

Owns: ``Job`` (per segment: queued -> generating -> ready | failed, with the take made or the error),
its JSON snapshot for the API and the page, waiting for the next change (server-sent events), and
``JobBoard``, the bounded set of this process's recent jobs.
Does not own: running the work (``productions.service``), the segments' stored state (the database).

Jobs live in the process that runs them (a job id is answered by the host that started it); what
they produce -- takes and segment states -- is in the database, which every host reads.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict

from productions.repo_ids import new_id

JOB_STATES = ("queued", "generating", "ready", "failed")
MAX_JOBS_KEPT = 256


class Job:
    """One generation request over some segments of a production (thread-safe)."""

    def __init__(self, production_id: str, segment_ids: list[str], reason: str = "generate") -> None:
        self.id = new_id("job")
        self.production_id = production_id
        self.reason = reason
        self.created_at = time.time()
        self.finished_at: float | None = None
        self._cond = threading.Condition()
        self._version = 0
        self._order = list(segment_ids)
        self._states = {sid: "queued" for sid in segment_ids}
        self._takes: dict[str, str] = {}
        self._errors: dict[str, str] = {}
        if not segment_ids:
            self.finished_at = self.created_at

    def update(self, segment_id: str, state: str, take_id: str | None = None, error: str | None = None) -> None:
        assert state in JOB_STATES, state
        with self._cond:
            self._states[segment_id] = state
            if take_id:
                self._takes[segment_id] = take_id
            if error:
                self._errors[segment_id] = error
            if all(s in ("ready", "failed") for s in self._states.values()):
                self.finished_at = time.time()
            self._version += 1
            self._cond.notify_all()

    @property
    def done(self) -> bool:
        return self.finished_at is not None

    def wait_change(self, version: int, timeout: float) -> int:
        """Block until the job changed after ``version`` (or ``timeout`` s); returns the current version."""
        with self._cond:
            self._cond.wait_for(lambda: self._version != version or self.done, timeout)
            return self._version

    def snapshot(self) -> dict:
        with self._cond:
            counts = {state: 0 for state in JOB_STATES}
            for state in self._states.values():
                counts[state] += 1
            return {"id": self.id, "object": "production.job", "production_id": self.production_id,
                    "reason": self.reason, "created_at": self.created_at, "finished_at": self.finished_at,
                    "done": self.done, "version": self._version, "counts": counts,
                    "progress": (counts["ready"] + counts["failed"]) / len(self._order) if self._order else 1.0,
                    "segments": [{"id": sid, "state": self._states[sid], "take_id": self._takes.get(sid),
                                  "error": self._errors.get(sid)} for sid in self._order]}


class JobBoard:
    """This process's recent jobs, the oldest finished ones forgotten past :data:`MAX_JOBS_KEPT`."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._jobs: OrderedDict[str, Job] = OrderedDict()

    def add(self, job: Job) -> Job:
        with self._lock:
            self._jobs[job.id] = job
            while len(self._jobs) > MAX_JOBS_KEPT:
                oldest = next((k for k, j in self._jobs.items() if j.done), None)
                if oldest is None:
                    break
                del self._jobs[oldest]
        return job

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            return self._jobs.get(job_id)

    def running(self, production_id: str) -> list[Job]:
        with self._lock:
            return [j for j in self._jobs.values() if j.production_id == production_id and not j.done]
