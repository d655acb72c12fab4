"""llm.batching: requests within the window share a batch, batches respect max_batch, a lone
request waits no longer than the window, errors reach every caller, calls never overlap."""

import threading
import time

import pytest

from llm.batching import BatchScheduler


class Recorder:
    """A run_batch that records its batches and checks that calls never overlap."""

    def __init__(self, delay=0.0, fail=False):
        self.batches, self.delay, self.fail = [], delay, fail
        self.active = 0
        self.overlapped = False

    def __call__(self, batch):
        self.active += 1
        self.overlapped |= self.active > 1
        time.sleep(self.delay)
        self.batches.append(list(batch))
        self.active -= 1
        if self.fail:
            raise RuntimeError("model exploded")
        return [x * 10 for x in batch]


def _concurrently(fn, args):
    results = [None] * len(args)
    barrier = threading.Barrier(len(args))

    def run(i):
        barrier.wait()
        results[i] = fn(args[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(args))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    return results


def test_concurrent_requests_share_one_batch():
    rec = Recorder()
    sched = BatchScheduler(rec, window_s=0.3, max_batch=4)
    try:
        assert _concurrently(sched.run, [1, 2, 3]) == [10, 20, 30]
    finally:
        sched.close()
    assert sched.batch_sizes == [3]
    assert sorted(rec.batches[0]) == [1, 2, 3]
    assert sched.stats()["batches"] == 1 and sched.stats()["requests"] == 3


def test_max_batch_is_respected_and_calls_never_overlap():
    rec = Recorder(delay=0.02)
    sched = BatchScheduler(rec, window_s=0.2, max_batch=2)
    try:
        assert sched.run_many([1, 2, 3, 4, 5]) == [10, 20, 30, 40, 50]
    finally:
        sched.close()
    assert sched.batch_sizes == [2, 2, 1]
    assert not rec.overlapped


def test_a_lone_request_runs_alone():
    sched = BatchScheduler(Recorder(), window_s=0.05, max_batch=8)
    try:
        assert sched.run(7) == 70
    finally:
        sched.close()
    assert sched.batch_sizes == [1]


def test_batching_off_runs_one_by_one():
    sched = BatchScheduler(Recorder(), window_s=1.0, max_batch=1)
    try:
        assert sched.run_many([1, 2]) == [10, 20]
    finally:
        sched.close()
    assert sched.batch_sizes == [1, 1]


def test_a_failing_batch_fails_every_caller():
    sched = BatchScheduler(Recorder(fail=True), window_s=0.2, max_batch=4)
    futures = [sched.submit(i) for i in range(3)]
    try:
        for f in futures:
            with pytest.raises(RuntimeError, match="model exploded"):
                f.result(5)
        assert sched.run_many([]) == []
    finally:
        sched.close()
    with pytest.raises(RuntimeError, match="closed"):
        sched.submit(1)


def test_bad_parameters():
    with pytest.raises(ValueError):
        BatchScheduler(Recorder(), window_s=0.0, max_batch=0)


def test_a_request_racing_close_is_still_served():
    """A submit that passed the closed check while close() ran must not land behind the stop
    marker (its caller would wait forever)."""
    scheduler = BatchScheduler(Recorder(), window_s=0.0, max_batch=4)
    real_put = scheduler._queue.put

    def put_while_closing(item, *args, **kwargs):   # fault injection: close() runs mid-submit
        closer = threading.Thread(target=scheduler.close)
        closer.start()
        closer.join(0.3)
        real_put(item, *args, **kwargs)

    scheduler._queue.put = put_while_closing
    future = scheduler.submit(7)
    scheduler._queue.put = real_put
    assert future.result(timeout=5) == 70
    with pytest.raises(RuntimeError, match="closed"):
        scheduler.submit(8)
