"""Long fuzzing run (hypothesis) of audio decoding and every JSON/multipart body of the API.

The same strategies and properties as tests/test_fuzz.py (``testkit.fuzzing``), with many more
examples: decoding must give an ``Audio`` or an ``InputError``; the app (preview engine, through
Starlette's TestClient) must answer every body below 500. Prints how many inputs were tried per
target, how they were answered, and the first failure (hypothesis' shrunk example) if any.

    PYTHONPATH=$PWD .venv/bin/python bench/fuzz.py --examples 2000
"""

from __future__ import annotations

import argparse
import collections
import sys
import tempfile
import time
from pathlib import Path

from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings

from common import environment_header
from core.settings import load_settings
from funasr_cache.store import PromptCache
from preview.engine import PreviewEngine
from testkit import fuzzing
from testkit.studio_server import speech_wav
from web.server import create_app


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=2000, help="inputs per target")
    args = parser.parse_args(argv)
    print(environment_header())
    run = settings(max_examples=args.examples, deadline=None, database=None,
                   suppress_health_check=list(HealthCheck))
    outcomes: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    failures = 0

    def target(name, body):
        nonlocal failures
        started = time.perf_counter()
        try:
            body()
        except Exception as exc:  # noqa: BLE001 - report, go on with the next target
            failures += 1
            print(f"{name}: FAILED: {type(exc).__name__}: {str(exc)[:2000]}")
        print(f"{name}: {sum(outcomes[name].values())} inputs in {time.perf_counter() - started:.0f} s; "
              + ", ".join(f"{k}: {v}" for k, v in sorted(outcomes[name].items())))

    @run
    @given(fuzzing.audio_bytes)
    def decoding(data):
        outcomes["decoding"][fuzzing.check_decoding(data)] += 1

    target("decoding", decoding)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        conf = load_settings(["--cache-dir", str(root / "cache"), "--data-dir", str(root / "data"),
                              "--max-upload-bytes", "300000",
                              "--max-prompt-seconds", "5", "--bundle-key", "fuzzing-bundle-key-123"], env={})
        app = create_app(PreviewEngine(conf, PromptCache.from_settings(conf)), conf, root / "out")
        with TestClient(app, raise_server_exceptions=False) as client:
            voice = client.post("/v1/audio/voices", files={"file": ("s.wav", speech_wav(seconds=1.0), "audio/wav")},
                                data={"transcript": "a short hum"}).json()["id"]
            bundle = client.get(f"/v1/audio/voices/{voice}/export").content

            @run
            @given(fuzzing.speech_bodies(voice))
            def speech(body):
                status = fuzzing.check_response(client.post("/v1/audio/speech", content=body,
                                                            headers={"Content-Type": "application/json"}))
                outcomes["speech JSON"][status] += 1

            @run
            @given(fuzzing.form_request(voice, bundle))
            def forms(request):
                path, fields, files = request
                status = fuzzing.check_response(client.post(path, data=fields, files=files or None))
                outcomes["multipart forms"][f"{path} {status}"] += 1

            target("speech JSON", speech)
            target("multipart forms", forms)
    print("5xx or crashes: " + ("none" if not failures else f"{failures} target(s) failed"))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
