"""llm.native.NativeBackend: continuous batching on the golden Step1 and on a tiny real-layout Step1.

Covers: the golden greedy ids through the backend with two rows batched; a request that joins a
running batch mid-decode gets the ids it gets alone; a row that finishes early finishes before the
others (checked by the order of the worker's own events, never by wall-clock time); ids are
streamed as they are sampled; cancellation frees the slot; static batching (the benchmark's
baseline) makes a late request wait; a failing model fails its rows and the worker survives; close.

The event order comes from a ``GenerationStream`` subclass that records ``put``/``finish`` calls as
the single worker thread makes them.
"""

import threading

import pytest
import torch
from conftest import FIXTURES
from safetensors.torch import load_file

from core.errors import InputError, ModelError
from llm.backend import GenerationCancelled, GenerationRequest, GenerationStream
from llm.checkpoint import load_step1
from llm.native import NativeBackend
from llm.sampling import SamplingConfig

GOLDEN = load_file(str(FIXTURES / "llm" / "golden_step1.safetensors"))
# Greedy without the repetition ban (a window longer than any sequence) or the audio slot mask: what
# the reference's plain ``generate`` did for the golden ids.
GREEDY = SamplingConfig(top_k=1, slot_mask=False, repetition_window=10**6, max_length=256)
SAMPLED = SamplingConfig(slot_mask=False, max_length=256)   # temperature 0.7, top-k 50 on the 512-id vocab


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model():
    return load_step1(FIXTURES / "llm", "cpu", torch.float32)


class Recording(GenerationStream):
    """A stream that logs ("put", name, id) and ("finish", name) into a shared list, and can run a
    callback on its n-th id (from the worker thread, so its place in the order is exact)."""

    def __init__(self, request, name, events, on_put=None):
        super().__init__(request)
        self.name, self.events, self.on_put = name, events, on_put or {}

    def put(self, token_id):
        self.events.append(("put", self.name, token_id))
        super().put(token_id)
        count = sum(1 for e in self.events if e[:2] == ("put", self.name))
        if count in self.on_put:
            self.on_put[count]()

    def finish(self, output):
        self.events.append(("finish", self.name))
        super().finish(output)


def _backend(model, sampling, start=True, **kw):
    return NativeBackend(model, None, sampling, eos_ids=(3,), start=start, **kw)


def _alone(model, sampling, request):
    backend = _backend(model, sampling)
    try:
        return backend.submit(request).result(120)
    finally:
        backend.close()


def test_two_batched_rows_give_the_golden_greedy_ids(model):
    backend = _backend(model, GREEDY, start=False)
    try:
        a = backend.submit(GenerationRequest(tuple(GOLDEN["prompt_a"].tolist()), seed=0, max_new_tokens=16))
        b = backend.submit(GenerationRequest(tuple(GOLDEN["prompt_b"].tolist()), seed=0, max_new_tokens=16))
        backend.start()
        out_a, out_b = a.result(120), b.result(120)
    finally:
        backend.close()
    assert list(out_a.answer) == GOLDEN["greedy_a"].tolist()
    assert list(out_b.answer) == GOLDEN["greedy_b"].tolist()
    assert out_a.batch_size == out_b.batch_size == 2


def test_ids_are_streamed_as_they_are_sampled(model):
    backend = _backend(model, SAMPLED)
    try:
        stream = backend.submit(GenerationRequest(tuple(GOLDEN["prompt_b"].tolist()), seed=4, max_new_tokens=12))
        streamed = list(stream)
        out = stream.result(1)
    finally:
        backend.close()
    assert streamed == list(out.answer) and 0 < len(streamed) <= 12
    assert out.steps >= len(out.answer) and out.prefill_ms > 0 and out.queue_ms >= 0


def test_a_request_joining_mid_decode_gets_its_solo_answer(model):
    config = SamplingConfig(slot_mask=False, max_length=256, min_new_tokens=40)
    long_req = GenerationRequest(tuple(GOLDEN["prompt_a"].tolist()), seed=11, max_new_tokens=40)
    short_req = GenerationRequest(tuple(GOLDEN["prompt_b"].tolist()), seed=12, max_new_tokens=10)
    events, joined = [], {}
    backend = _backend(model, config)
    try:
        # On the long row's 5th id (inside the worker), the short request is submitted: it joins
        # the running batch at the next step, while the long row still has 35 ids to go.
        def join():
            joined["stream"] = backend.submit(short_req, Recording(short_req, "short", events))

        long_stream = backend.submit(long_req, Recording(long_req, "long", events, on_put={5: join}))
        long_out, short_out = long_stream.result(120), joined["stream"].result(120)
    finally:
        backend.close()
    short_puts = [i for i, e in enumerate(events) if e[:2] == ("put", "short")]
    long_puts = [i for i, e in enumerate(events) if e[:2] == ("put", "long")]
    assert long_puts[4] < short_puts[0] < long_puts[-1]            # it really joined mid-decode
    assert short_out.batch_size == 2 and long_out.batch_size == 2
    assert short_out.answer == _alone(model, config, short_req).answer
    assert long_out.answer == _alone(model, config, long_req).answer


def test_a_row_that_finishes_early_returns_before_the_others(model):
    config = SamplingConfig(slot_mask=False, max_length=256, min_new_tokens=30)
    events = []
    backend = _backend(model, config, start=False)
    try:
        reqs = {"long": GenerationRequest(tuple(GOLDEN["prompt_a"].tolist()), seed=1, max_new_tokens=30),
                "short": GenerationRequest(tuple(GOLDEN["prompt_b"].tolist()), seed=2, max_new_tokens=4)}
        streams = {n: backend.submit(r, Recording(r, n, events)) for n, r in reqs.items()}
        backend.start()
        outs = {n: s.result(120) for n, s in streams.items()}
    finally:
        backend.close()
    assert len(outs["short"].answer) == 4 and len(outs["long"].answer) == 30
    short_done = events.index(("finish", "short"))
    long_puts_after = [e for e in events[short_done:] if e[:2] == ("put", "long")]
    assert len(long_puts_after) == 30 - 4      # finished right after its 4th id, while the long row had 26 to go
    assert events[-1] == ("finish", "long")


def test_static_batching_makes_a_late_request_wait_for_the_batch(model):
    config = SamplingConfig(slot_mask=False, max_length=256, min_new_tokens=20)
    events, late = [], {}
    backend = _backend(model, config, join_running=False)
    try:
        req = GenerationRequest(tuple(GOLDEN["prompt_b"].tolist()), seed=3, max_new_tokens=20)

        def submit_late():
            late["s"] = backend.submit(req, Recording(req, "late", events))

        first = backend.submit(req, Recording(req, "first", events, on_put={2: submit_late}))
        first.result(120), late["s"].result(120)
    finally:
        backend.close()
    assert events.index(("finish", "first")) < next(i for i, e in enumerate(events) if e[:2] == ("put", "late"))


def test_cancelling_drops_the_row_and_frees_its_slot(model):
    config = SamplingConfig(slot_mask=False, max_length=256, min_new_tokens=50)
    events = []
    backend = _backend(model, config, max_rows=1, step_token_budget=64)
    try:
        req = GenerationRequest(tuple(GOLDEN["prompt_b"].tolist()), seed=5, max_new_tokens=50)
        holder = {}
        stream = backend.submit(req, Recording(req, "c", events, on_put={3: lambda: holder["s"].cancel()}))
        holder["s"] = stream
        with pytest.raises(GenerationCancelled):
            stream.result(120)
        assert stream.done and 3 <= len([e for e in events if e[0] == "put"]) < 50
        # The only slot is free again: a new request runs to the end.
        after = backend.submit(GenerationRequest(req.prompt_ids, seed=6, max_new_tokens=5)).result(120)
        assert len(after.answer) == 5
        assert backend.stats()["rows_running"] == 0
    finally:
        backend.close()


def test_a_failing_model_fails_its_rows_and_the_worker_survives(model):
    backend = _backend(model, SAMPLED)
    real_forward = model.forward
    try:
        model.forward = lambda *a, **k: (_ for _ in ()).throw(RuntimeError("CUDA out of memory"))  # fault injection
        failed = backend.submit(GenerationRequest((1, 2, 3), seed=1, max_new_tokens=3))
        with pytest.raises(RuntimeError, match="out of memory"):
            failed.result(60)
        model.forward = real_forward
        assert len(backend.submit(GenerationRequest((1, 2, 3), seed=1, max_new_tokens=3)).result(60).answer) >= 1
        assert backend.ready() == (True, "ok") and backend.stats()["requests_failed"] == 1
    finally:
        model.forward = real_forward
        backend.close()


def test_bad_prompts_and_a_closed_backend(model):
    backend = _backend(model, SamplingConfig(slot_mask=False, max_length=64))
    try:
        with pytest.raises(InputError, match="empty"):
            backend.submit(GenerationRequest((), seed=1))
        with pytest.raises(InputError, match="limit is 64"):
            backend.submit(GenerationRequest(tuple(range(60)), seed=1))
    finally:
        backend.close()
    assert backend.ready()[0] is False
    with pytest.raises(ModelError, match="closed"):
        backend.submit(GenerationRequest((1, 2), seed=1))


def test_close_fails_streams_still_waiting(model):
    backend = _backend(model, SAMPLED, start=False)
    stream = backend.submit(GenerationRequest((1, 2, 3), seed=1, max_new_tokens=3))
    backend.close()
    with pytest.raises(RuntimeError, match="closed"):
        stream.result(5)


def test_settings_are_checked(model):
    with pytest.raises(ValueError, match="step_token_budget"):
        _backend(model, SAMPLED, max_rows=8, step_token_budget=8)


def test_many_concurrent_clients_each_get_their_solo_answer(model):
    """More requests than rows, from several threads: every answer equals its solo run."""
    config = SamplingConfig(slot_mask=False, max_length=256)
    reqs = [GenerationRequest(tuple(GOLDEN["prompt_a"][: 10 + 3 * i].tolist()), seed=20 + i, max_new_tokens=6 + i)
            for i in range(6)]
    backend = _backend(model, config, max_rows=3, step_token_budget=16)   # prompts prefilled in chunks
    outs = [None] * len(reqs)
    try:
        def run(i):
            outs[i] = backend.submit(reqs[i]).result(120)

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(reqs))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    finally:
        backend.close()
    assert [o.answer for o in outs] == [_alone(model, config, r).answer for r in reqs]


# ---------------------------------------------------------------- issue 25: static decode steps, small defects


def test_non_finite_values_left_in_a_freed_slot_do_not_poison_a_new_row(model):
    """A row reads keys past its own positions (the batch's widest, rounded up) with weight zero; NaN there
    made its softmax NaN. Slots are cleared when a row takes them."""
    backend = _backend(model, GREEDY, start=False)
    try:
        for t in backend.cache.keys + backend.cache.values:       # what earlier rows may leave behind
            t.fill_(float("nan"))
        a = backend.submit(GenerationRequest(tuple(GOLDEN["prompt_a"].tolist()), seed=0, max_new_tokens=16))
        b = backend.submit(GenerationRequest(tuple(GOLDEN["prompt_b"].tolist()), seed=0, max_new_tokens=16))
        backend.start()
        assert list(a.result(120).answer) == GOLDEN["greedy_a"].tolist()
        assert list(b.result(120).answer) == GOLDEN["greedy_b"].tolist()
    finally:
        backend.close()


def test_decode_buckets_pad_rows_and_keys_without_changing_a_rows_logits(model):
    from llm.decode_step import DecodeStep, row_bucket

    assert [row_bucket(n, 8) for n in (1, 2, 3, 5, 8)] == [1, 2, 4, 8, 8] and row_bucket(3, 3) == 3
    prompts = [GOLDEN["prompt_a"][:9], GOLDEN["prompt_b"][:5], GOLDEN["prompt_a"][10:17]]
    cache = model.new_cache(4, 64)
    step = DecodeStep(model, cache, width_step=16)
    assert not step.graphs                                          # CPU: same static shapes, no capture
    with torch.inference_mode():
        for slot, p in enumerate(prompts):
            model(p[None, :-1], torch.arange(len(p) - 1)[None], cache, torch.tensor([slot]))
        # 3 rows run as a bucket of 4 (one padding row), keys rounded up from 9 to 16.
        batched = step([int(p[-1]) for p in prompts], [len(p) - 1 for p in prompts], [0, 1, 2]).clone()
        for slot, p in enumerate(prompts):
            solo = model.new_cache(1, 64)
            logits = model(p[None], torch.arange(len(p))[None], solo, torch.tensor([0]))[0, -1]
            torch.testing.assert_close(batched[slot], logits, atol=1e-5, rtol=0)
    assert step.width(9) == 16 and step.width(64) == 64 and step.width(63) == 64


def test_close_does_not_fail_rows_the_worker_is_still_running(model):
    """close() used to fail every row after its join timed out while the worker was still inside a step,
    which then went on writing to the failed streams. Now the worker fails its own rows when it leaves."""
    events, inside, release = [], threading.Event(), threading.Event()

    class Logged(Recording):
        def fail(self, error):
            self.events.append(("fail", self.name))
            super().fail(error)

    backend = _backend(model, SamplingConfig(slot_mask=False, max_length=256, min_new_tokens=30))
    backend.close_timeout_s = 0.2
    real_forward = model.forward

    def slow_forward(*args, **kwargs):          # fault injection: a step that outlasts close()'s join
        if len([e for e in events if e[0] == "put"]) >= 2:
            inside.set()
            release.wait(30)
        return real_forward(*args, **kwargs)

    req = GenerationRequest(tuple(GOLDEN["prompt_b"].tolist()), seed=9, max_new_tokens=30)
    model.forward = slow_forward
    try:
        stream = backend.submit(req, Logged(req, "row", events))
        assert inside.wait(60)
        backend.close()                          # returns after 0.2 s with the worker still in its step
        assert ("fail", "row") not in events
        release.set()
        with pytest.raises(RuntimeError, match="closed"):
            stream.result(60)
    finally:
        release.set()
        model.forward = real_forward
        backend._thread.join(60)
    assert events[-1] == ("fail", "row")          # the worker finished its step first, then failed the row
    assert events.count(("fail", "row")) == 1


def test_a_seed_draws_the_ids_a_cpu_multinomial_drew(model):
    """The draw moved to the device (argmax(p / Exp(1)) with the row generator's numbers) so a step copies
    ids, not probabilities, to the host; a seed must still give the takes it gave before (torch.multinomial)."""
    import collections

    from llm.sampling import repetition_ban, top_candidates

    config = SamplingConfig(slot_mask=False, max_length=256)
    req = GenerationRequest(tuple(GOLDEN["prompt_b"].tolist()), seed=17, max_new_tokens=24)
    generator = torch.Generator().manual_seed(17)
    prompt, answer = list(req.prompt_ids), []
    recent = collections.deque(prompt[-config.repetition_window:], maxlen=config.repetition_window)
    cache = model.new_cache(1, 256)
    with torch.inference_mode():
        logits = model(torch.tensor([prompt]), torch.arange(len(prompt))[None], cache, torch.tensor([0]),
                       logits_at=torch.tensor([len(prompt) - 1])).float()
        for _ in range(24):
            scores = repetition_ban(torch.tensor([list(recent)]), logits, config.repetition_window,
                                    torch.tensor([len(prompt) + len(answer)]))
            probs, ids = top_candidates(scores / config.temperature, config.top_k, config.top_p)
            token = int(ids[0, torch.multinomial(probs[0], 1, generator=generator)])
            if token == 3:
                break
            answer.append(token)
            recent.append(token)
            logits = model(torch.tensor([[token]]), torch.tensor([[len(prompt) + len(answer) - 1]]), cache,
                           torch.tensor([0]), logits_at=torch.tensor([0])).float()
    assert len(answer) > 5
    assert list(_alone(model, config, req).answer) == answer
