"""Shared test setup: offline environment, fixture paths, golden data, a running studio, concurrency.

Shared here (instead of copies in several files):
    golden data     ``load_tokenizer_golden()``/``load_decoder_golden()`` (cached loaders, for module
                    constants) and the session fixtures ``tokenizer_golden``/``decoder_golden``;
                    ``golden_tokens()``; the session fixture ``fixture_tokenizer`` (the tokenizer of
                    tests/fixtures/tokenizer, loaded once).
    a studio        the module fixture ``studio``: the real app with the preview engine on
                    127.0.0.1, with the extra command-line flags of the module's ``STUDIO_FLAGS``.
    concurrency     the fixture ``concurrently(fn, calls)``: runs ``fn(*args)`` for every ``args`` in
                    ``calls`` on its own thread, all released at once, and returns their results in
                    order (the first exception is raised after every thread ended).

Every test must pass alone and in any subset: a test that needs cache hits, stored voices or
earlier results makes them itself (or through a fixture), never relies on another test.
"""

import functools
import json
import os
import threading
from pathlib import Path

# Before anything imports gradio / transformers / funasr: never reach the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")


import pytest

from testkit.paths import FIXTURES, ROOT  # noqa: F401  (re-exported for the tests)

TOK_DIR = FIXTURES / "tokenizer" / "Step-Audio-Tokenizer"
DECODER_DIR = FIXTURES / "decoder"


@functools.cache
def load_tokenizer_golden() -> dict:
    """The tokenizer's golden arrays (numpy), tests/fixtures/tokenizer/golden_tokenizer.safetensors."""
    from safetensors.numpy import load_file

    return load_file(str(FIXTURES / "tokenizer" / "golden_tokenizer.safetensors"))


@functools.cache
def load_tokenizer_golden_json() -> dict:
    return json.loads((FIXTURES / "tokenizer" / "golden_tokenizer.json").read_text())


@functools.cache
def load_decoder_golden() -> dict:
    """The decoder's golden tensors (torch), tests/fixtures/decoder/golden_decoder.safetensors."""
    from safetensors.torch import load_file

    return load_file(str(DECODER_DIR / "golden_decoder.safetensors"))


def golden_tokens():
    """The reference's vq02/vq06 codes of the golden clip, as ``tokenizer.step_audio.Tokens``."""
    from tokenizer.step_audio import Tokens

    golden = load_tokenizer_golden()
    return Tokens(tuple(golden["vq02"].tolist()), tuple(golden["vq06"].tolist()))


@pytest.fixture
def fixtures() -> Path:
    return FIXTURES


@pytest.fixture(scope="session")
def tokenizer_golden() -> dict:
    return load_tokenizer_golden()


@pytest.fixture(scope="session")
def decoder_golden() -> dict:
    return load_decoder_golden()


@pytest.fixture(scope="session")
def fixture_tokenizer():
    """The tokenizer of tests/fixtures/tokenizer on the CPU (pure, so sharing it is safe)."""
    from tokenizer.step_audio import StepAudioTokenizer

    return StepAudioTokenizer.load(TOK_DIR, device="cpu")


@pytest.fixture(scope="module")
def studio(request, tmp_path_factory):
    """The studio (preview engine) on 127.0.0.1 for this module; extra flags from ``STUDIO_FLAGS``."""
    from testkit.studio_server import start_studio

    flags = tuple(getattr(request.module, "STUDIO_FLAGS", ()))
    server = start_studio(tmp_path_factory.mktemp("studio"), None, *flags)
    yield server
    server.stop()


def run_concurrently(fn, calls, timeout: float = 120.0) -> list:
    """``[fn(*args) for args in calls]``, each on its own thread, started together by a barrier."""
    calls = [tuple(args) for args in calls]
    barrier = threading.Barrier(len(calls))
    results, errors = [None] * len(calls), []

    def work(i):
        try:
            barrier.wait(timeout)
            results[i] = fn(*calls[i])
        except BaseException as exc:  # noqa: BLE001 - re-raised below, in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,), name=f"concurrently-{i}") for i in range(len(calls))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout)
    if any(thread.is_alive() for thread in threads):
        raise TimeoutError(f"{sum(t.is_alive() for t in threads)} of {len(threads)} calls still running "
                           f"after {timeout:.0f} s")
    if errors:
        raise errors[0]
    return results


@pytest.fixture
def concurrently():
    return run_concurrently


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core runner they lose a lot."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def postgres(tmp_path_factory):
    """A throwaway PostgreSQL cluster for the whole session (skipped when PostgreSQL is not installed);
    tests make their own database in it with ``fresh_pg_database``."""
    from testkit.postgres import pg_binaries, start_postgres

    if pg_binaries() is None:
        pytest.skip("PostgreSQL is not installed (scripts/install.sh --test installs it)")
    server = start_postgres()
    yield server
    server.close()


def fresh_pg_database(server) -> str:
    """A new empty database in the ``postgres`` fixture's cluster; returns its URL."""
    import secrets

    name = "t_" + secrets.token_hex(6)
    server.psql(f"CREATE DATABASE {name} OWNER studio")
    return server.url.rsplit("/", 1)[0] + "/" + name


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request, tmp_path):
    """An empty user-data database URL: an SQLite file, and (when installed) a PostgreSQL database."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'studio.db'}"
    return fresh_pg_database(request.getfixturevalue("postgres"))
