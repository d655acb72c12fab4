"""Voices survive kill -9 at every step of a create or a delete (issue 21 item 7), on SQLite and
(when installed) PostgreSQL: a real child process (forked, so it starts fast) runs the store's
create or delete and is stopped with SIGKILL just before each of its SQL statements, before its
commit, and after it returned. Afterwards the voice is either whole or absent -- never half --
``VoiceStore.check()`` finds nothing, and the next process creates the same voice normally.

The fault is injected by wrapping ``Connection.execute`` in the child only (it pauses and reports
its step); everything else is the real store on a real database.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import time

import numpy as np
import pytest
from sqlalchemy import event
from sqlalchemy.engine import Connection

from core.audio_io import Audio
from funasr_cache.store import PromptEntry, audio_digest
from userdata.db import Database
from userdata.voices import VoiceNotFound, VoiceStore

VOICE = "durable-voice"
FORK = multiprocessing.get_context("fork")


def _clip() -> Audio:
    rng = np.random.default_rng(3)
    channels = (0.2 * rng.standard_normal((2, 16000))).astype(np.float32)
    return Audio(channels.mean(axis=0), 16000, channels=channels)


def _prompts(audio: Audio) -> tuple[PromptEntry, ...]:
    digest = audio_digest(audio.samples, audio.sample_rate)
    return (PromptEntry("tokens", "tok@1/v1", digest, {"n": 4}, {"codes": np.arange(4, dtype=np.int64)}, 0.3),
            PromptEntry("features", "feat@1/v1", digest, {"m": 1}, {"mel": np.ones((2, 3), np.float32)}, 0.2))


def _child(url: str, op: str, pause_at: int, pipe) -> None:
    """Run ``op`` and pause (forever, until killed) at statement ``pause_at``, at the commit
    (step ``"commit"``), or after it returned (``"done"``)."""
    db = Database(url)
    db.schema_ready = True
    store = VoiceStore(db)
    steps = [0]
    original = Connection.execute

    def pause(label):
        pipe.send(label)
        time.sleep(120)

    def execute(self, *args, **kwargs):
        steps[0] += 1
        if steps[0] == pause_at:
            pause(f"step {pause_at}")
        return original(self, *args, **kwargs)

    Connection.execute = execute
    if pause_at == 0:
        event.listen(db.engine, "commit", lambda conn: pause("commit"))
    audio = _clip()
    if op == "create":
        store.create(audio, "words that last", "Durable", {"tokens": "tok@1/v1"}, voice_id=VOICE,
                     prompts=_prompts(audio))
    else:
        store.delete(VOICE)
    pause("done")


def _run_until(url: str, op: str, pause_at: int) -> str:
    """Start the child, wait for its pause, kill -9 it; returns where it was."""
    parent, child = FORK.Pipe(duplex=False)
    proc = FORK.Process(target=_child, args=(url, op, pause_at, child), daemon=True)
    proc.start()
    try:
        if not parent.poll(60):
            raise AssertionError(f"the {op} child never paused (exit code {proc.exitcode})")
        where = parent.recv()
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(30)
    assert proc.exitcode == -signal.SIGKILL
    return where


def _state(store: VoiceStore, audio: Audio) -> str:
    """"whole" or "absent"; fails the test on anything in between."""
    assert store.check() == [], store.check()
    try:
        voice = store.get(VOICE)
    except VoiceNotFound:
        assert store.prompts(VOICE) == () and store.usage() == (0, 0)
        return "absent"
    back = store.audio(VOICE)
    assert voice.digest == audio_digest(back.samples, back.sample_rate) == audio_digest(audio.samples, 16000)
    assert [p.kind for p in store.prompts(VOICE)] == ["features", "tokens"]
    return "whole"


@pytest.mark.parametrize("op", ["create", "delete"])
def test_kill_9_at_every_step_leaves_the_voice_whole_or_absent(database_url, op):
    db = Database(database_url)
    db.migrate()
    store = VoiceStore(db)
    audio = _clip()
    seen = []
    for pause_at in range(1, 40):
        if op == "delete":
            store.create(audio, "words that last", "Durable", voice_id=VOICE, prompts=_prompts(audio))
        where = _run_until(database_url, op, pause_at)
        if where == "done":          # the operation has fewer statements than pause_at: it finished
            assert _state(store, audio) == ("whole" if op == "create" else "absent")
            if op == "create":
                store.delete(VOICE)
            break
        seen.append(where)
        assert _state(store, audio) == ("absent" if op == "create" else "whole"), where
        if op == "delete":
            store.delete(VOICE)       # the next round starts from a stored voice again
    assert len(seen) >= (6 if op == "create" else 4), seen   # every statement was a kill point
    if op == "delete":
        store.create(audio, "words that last", "Durable", voice_id=VOICE, prompts=_prompts(audio))
    assert _run_until(database_url, op, 0) == "commit"
    assert _state(store, audio) == ("absent" if op == "create" else "whole")
    assert _run_until(database_url, op, 10**6) == "done"
    assert _state(store, audio) == ("whole" if op == "create" else "absent")
    # A new process (the next start) carries on normally.
    if op == "create":
        store.delete(VOICE)
    store.create(audio, "words that last", "Durable", voice_id=VOICE, prompts=_prompts(audio))
    assert _state(store, audio) == "whole"
    db.close()
