"""Deployment files, the configuration reference and the model download script.

Covers: the Dockerfile (hadolint-clean; its ENV and CMD build valid Settings through the app's own
parser; its HEALTHCHECK probes /healthz; the build context keeps the code and drops weights),
docker-compose.yml (compose-spec schema; an environment entry for every setting, defaulting to the
app's defaults; GPU reservation, volumes, the scale profile, the vllm profile and its plugin), and -- slow -- both together: two real
app processes started with the image's CMD, ENV and compose's environment on one cache folder, probed
with the image's HEALTHCHECK, sharing a stored voice and its cached prompt work. Also
requirements-gpu.txt against requirements.txt, docs/configuration.md being current, and
scripts/download_models.py's checks on fake model folders (no network).
No Docker engine is needed or used.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import importlib.util
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import dockerfile
import pytest
import yaml
from conftest import ROOT
from huggingface_hub.hf_api import BlobLfsInfo, RepoSibling

from core.settings import ENV_PREFIX, FUNASR_SUBDIR, Settings, build_parser, load_settings

BIN = Path(sys.executable).parent
FUNASR_CONFIG = f"{FUNASR_SUBDIR}/config.yaml"
SETTING_ENV_NAMES = {ENV_PREFIX + f.name.upper() for f in dataclasses.fields(Settings)}
# Values the container sets on purpose (or that the app computes from the machine).
CONTAINER_SPECIFIC = {"host", "cache_dir", "model_root", "ort_intra_op_threads", "engine", "data_dir"}


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


dl = _load_script("download_models")
gen = _load_script("gen_config_doc")


# ------------------------------------------------------------------------------------------ Dockerfile

def _final_stage() -> list:
    commands = dockerfile.parse_file(str(ROOT / "Dockerfile"))
    last_from = max(i for i, c in enumerate(commands) if c.cmd == "FROM")
    return commands[last_from:]


def _instruction(stage: list, name: str):
    found = [c for c in stage if c.cmd == name]
    assert len(found) == 1, f"expected one {name} in the runtime stage, found {len(found)}"
    return found[0]


def _dockerfile_env(stage: list) -> dict[str, str]:
    env = {}
    for command in stage:
        if command.cmd == "ENV":
            env.update(zip(command.value[0::2], command.value[1::2]))
    return env


def test_hadolint_finds_nothing_in_the_dockerfile():
    run = subprocess.run([BIN / "hadolint", "--no-color", "Dockerfile"], cwd=ROOT, capture_output=True, text=True)
    assert (run.returncode, run.stdout + run.stderr) == (0, "")


def test_hadolint_is_really_linting():
    bad = "FROM ubuntu\nRUN apt-get update && apt-get install -y curl\n"
    run = subprocess.run([BIN / "hadolint", "--no-color", "-"], input=bad, capture_output=True, text=True)
    assert run.returncode != 0 and {"DL3006", "DL3009"} <= set(re.findall(r"DL\d{4}", run.stdout))


def test_image_cmd_and_env_are_the_apps_real_flags_and_variables():
    stage = _final_stage()
    cmd = _instruction(stage, "CMD")
    assert cmd.json and list(cmd.value[:2]) == ["python", "app.py"]
    flags = list(cmd.value[2:])
    build_parser().parse_args(flags)  # argparse exits (SystemExit) on a flag the app does not have

    env = _dockerfile_env(stage)
    studio_vars = {k: v for k, v in env.items() if k.startswith(ENV_PREFIX)}
    assert set(studio_vars) <= SETTING_ENV_NAMES, f"not settings: {set(studio_vars) - SETTING_ENV_NAMES}"
    settings = load_settings(flags, env=studio_vars)
    # Never a silent fallback in production: the image serves Step-Audio-EditX or fails loudly.
    assert settings.engine == "step-audio"
    assert (settings.host, settings.cache_dir, settings.model_root) == ("0.0.0.0", Path("/app/cache"), Path("/app/models"))
    assert _instruction(stage, "EXPOSE").value == (str(settings.port),)


def test_image_runs_as_non_root_with_cache_and_model_volumes():
    stage = _final_stage()
    user = _instruction(stage, "USER").value[0]
    assert user.split(":")[0] not in ("root", "0")
    assert {"/app/cache", "/app/models"} <= set(_instruction(stage, "VOLUME").value)
    # torch 2.13.0 on PyPI requires cuda-toolkit 13.0.x: the base image must be a CUDA 13.0 one.
    arg = next(c for c in dockerfile.parse_file(str(ROOT / "Dockerfile")) if c.cmd == "ARG")
    assert arg.value[0].startswith("CUDA_IMAGE=nvidia/cuda:13.0.")


def test_build_context_keeps_what_the_app_needs_and_drops_weights_and_cache():
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    def ignored(name: str) -> bool:
        return any(fnmatch.fnmatch(name, pattern) for pattern in patterns)

    needed = {p.name for p in ROOT.iterdir()
              if p.suffix == ".py" or (p.is_dir() and (p / "__init__.py").exists())}
    needed |= {"examples", "scripts", "requirements-gpu.txt"}
    assert not {n for n in needed if ignored(n)}, f"the image would lack {sorted(n for n in needed if ignored(n))}"
    # By name, whether or not the checkout has them (a CI checkout has no .venv, models or cache).
    assert all(ignored(name) for name in ("models", "cache", ".git", ".venv", "tests"))


def _healthcheck_argv() -> list[str]:
    check = _instruction(_final_stage(), "HEALTHCHECK")
    assert check.json and check.value[0] == "CMD"
    return list(check.value[1:])


def test_healthcheck_probes_healthz_on_the_configured_port_and_compose_uses_the_same():
    argv = _healthcheck_argv()
    assert argv[:2] == ["python", "-c"] and "/healthz" in argv[2] and "STUDIO_PORT" in argv[2]
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert compose["services"]["studio"]["healthcheck"]["test"] == ["CMD", *argv]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _app_env(tmp_path: Path, port: int, studio_vars: dict[str, str]) -> dict[str, str]:
    """A child environment with ``studio_vars``, listening on loopback ``port``, paths under tmp."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}
    env.update(studio_vars)
    env.update(STUDIO_HOST="127.0.0.1", STUDIO_PORT=str(port), STUDIO_CACHE_DIR=str(tmp_path / "cache"),
               STUDIO_DATA_DIR=str(tmp_path / "data"),
               STUDIO_MODEL_ROOT=str(tmp_path / "models"), GRADIO_TEMP_DIR=str(tmp_path / f"gradio-{port}"))
    return env


def _wait_until(probe: list[str], env: dict, server: subprocess.Popen, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and server.poll() is None:
        if subprocess.run(probe, env=env, capture_output=True).returncode == 0:
            return
        time.sleep(1)
    output = server.stdout.read() if server.poll() is not None else "(still running)"
    raise AssertionError(f"the health check never passed; app output:\n{output}")


def _stop(server: subprocess.Popen) -> None:
    server.terminate()
    try:
        server.wait(timeout=30)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()


@pytest.mark.slow
def test_image_cmd_and_healthcheck_run_two_replicas_sharing_one_cache(tmp_path):
    """The compose 'scale' set-up on CPU, started the way the image starts it.

    Two processes run the image's CMD with the image's ENV overlaid by compose's environment
    (paths moved to one tmp folder, loopback ports). The image's HEALTHCHECK command passes on
    both. A voice stored through replica A is served by replica B, whose clone finds the prompt
    work A did in the shared cache (an ``X-Cache-Hits`` stage). Once stopped, the check fails.
    """
    import httpx

    stage = _final_stage()
    services = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    studio_vars = {k: v for k, v in _dockerfile_env(stage).items() if k.startswith(ENV_PREFIX)}
    studio_vars.update(_resolve_defaults(services["studio"]["environment"]))
    studio_vars["STUDIO_ENGINE"] = "preview"  # the image's step-audio needs the real models; this runs on CPU
    cmd = [sys.executable, *_instruction(stage, "CMD").value[1:]]
    probe = [sys.executable, *_healthcheck_argv()[1:]]
    ports = [_free_port(), _free_port()]
    envs = [_app_env(tmp_path, port, studio_vars) for port in ports]
    servers = [subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
               for env in envs]
    try:
        for env, server in zip(envs, servers):
            _wait_until(probe, env, server)
        a, b = (f"http://127.0.0.1:{port}" for port in ports)
        clip = (ROOT / "tests" / "fixtures" / "prompt_22k.wav").read_bytes()
        created = httpx.post(f"{a}/v1/audio/voices", files={"file": ("prompt.wav", clip, "audio/wav")},
                             data={"transcript": "a short prompt clip"}, timeout=120)
        assert created.status_code == 201, created.text
        assert created.json()["prepared"]["hits"] == []  # replica A did the prompt work
        voice_id = created.json()["id"]
        assert httpx.get(f"{b}/v1/audio/voices/{voice_id}", timeout=30).status_code == 200
        speech = httpx.post(f"{b}/v1/audio/speech", timeout=120, json={
            "input": "Hello from the second replica.", "voice": voice_id, "response_format": "wav", "seed": 1})
        assert speech.status_code == 200, speech.text
        assert speech.headers["X-Cache-Hits"] != ""  # replica B reused A's cached prompt work
    finally:
        for server in servers:
            _stop(server)
    assert subprocess.run(probe, env=envs[0], capture_output=True).returncode != 0


# ------------------------------------------------------------------------------------------ compose

def _check_compose(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([BIN / "check-jsonschema", "--builtin-schema", "vendor.compose-spec", str(path)],
                          capture_output=True, text=True)


def test_compose_file_follows_the_compose_specification(tmp_path):
    run = _check_compose(ROOT / "docker-compose.yml")
    assert run.returncode == 0, run.stdout + run.stderr
    # The same check rejects a mistake inside the shared x-studio block (merged into both services).
    broken = (ROOT / "docker-compose.yml").read_text().replace("  init: true\n", "  init: true\n  gpus_please: 1\n")
    (tmp_path / "docker-compose.yml").write_text(broken)
    run = _check_compose(tmp_path / "docker-compose.yml")
    assert run.returncode != 0 and "gpus_please" in run.stdout


def _resolve_defaults(environment: dict) -> dict[str, str]:
    """The environment as compose gives it with no .env file: ${VAR:-default} -> default."""
    pattern = re.compile(r"\$\{[A-Z0-9_]+(?::?-([^}]*))?\}")
    return {k: pattern.sub(lambda m: m.group(1) or "", str(v)) for k, v in environment.items()}


def test_compose_sets_every_setting_with_the_apps_defaults():
    services = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    env = _resolve_defaults(services["studio"]["environment"])
    assert {k for k in env if k.startswith(ENV_PREFIX)} == SETTING_ENV_NAMES
    loaded, defaults = load_settings([], env=env), Settings()
    for f in dataclasses.fields(Settings):
        if f.name not in CONTAINER_SPECIFIC:
            assert getattr(loaded, f.name) == getattr(defaults, f.name), f.name
    assert (loaded.host, loaded.port, loaded.cache_dir, loaded.model_root, loaded.engine) == (
        "0.0.0.0", 7860, Path("/app/cache"), Path("/app/models"), "step-audio")
    assert services["studio-2"]["environment"] == services["studio"]["environment"]


def test_compose_gpu_volumes_and_scale_profile():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    studio, replica = compose["services"]["studio"], compose["services"]["studio-2"]
    for service in (studio, replica):
        device = service["deploy"]["resources"]["reservations"]["devices"][0]
        assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
        assert any(v.endswith(":/app/models:ro") for v in service["volumes"])
        assert "studio-cache:/app/cache" in service["volumes"]  # one cache, shared by the replicas
        assert service["restart"] == "unless-stopped"
    assert "profiles" not in studio and replica["profiles"] == ["scale"]
    assert "studio-cache" in compose["volumes"]
    host_ports = [p.rsplit(":", 1)[0] for p in studio["ports"] + replica["ports"]]
    assert len(set(host_ports)) == 2


def test_compose_vllm_profile_serves_the_llm_with_our_plugin_and_points_a_studio_at_it(tmp_path):
    from llm.vllm_view import serve_args

    services = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    vllm, studio = services["vllm"], services["studio-vllm"]
    assert vllm["profiles"] == studio["profiles"] == ["vllm"]
    assert vllm["image"].startswith("vllm/vllm-openai:v0.33.")
    device = vllm["deploy"]["resources"]["reservations"]["devices"][0]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert all(v.endswith(":ro") for v in vllm["volumes"])             # models and our code, read-only
    assert any(v.endswith(":/models:ro") for v in vllm["volumes"])
    # The image's entrypoint is `vllm serve`; the command is the rest of our own serve line.
    command = [_resolve_defaults({"a": c})["a"] for c in vllm["command"]]
    assert command == serve_args("/models/Step-Audio-EditX-vllm", gpu_memory_utilization=0.5)[2:]
    port = command[command.index("--port") + 1]
    assert f"127.0.0.1:{port}/health" in " ".join(vllm["healthcheck"]["test"])

    # The plugin imports with nothing but the two folders compose mounts on vLLM's PYTHONPATH.
    mounted = {v.split(":")[1] for v in vllm["volumes"] if v.startswith("./")}
    assert mounted == {"/opt/studio/llm", "/opt/studio/core"} and vllm["environment"]["PYTHONPATH"] == "/opt/studio"
    for folder in ("llm", "core"):
        shutil.copytree(ROOT / folder, tmp_path / folder)
    probe = subprocess.run([sys.executable, "-c", "import llm.vllm_plugin as p; print(p.PLUGIN_FQCN)"], cwd=tmp_path,
                           env={**os.environ, "PYTHONPATH": str(tmp_path)}, capture_output=True, text=True)
    assert probe.returncode == 0 and probe.stdout.strip() == command[command.index("--logits-processors") + 1], probe.stderr

    env = _resolve_defaults(studio["environment"])
    settings = load_settings([], env=env)
    assert (settings.llm_backend, settings.llm_url) == ("vllm", f"http://vllm:{port}")
    assert studio["depends_on"] == {"vllm": {"condition": "service_healthy"}}
    assert {k: v for k, v in env.items() if k not in ("STUDIO_LLM_BACKEND", "STUDIO_LLM_URL")} == \
        {k: v for k, v in _resolve_defaults(services["studio"]["environment"]).items()
         if k not in ("STUDIO_LLM_BACKEND", "STUDIO_LLM_URL")}
    host_ports = {p.rsplit(":", 1)[0] for name in ("studio", "studio-2", "studio-vllm") for p in services[name]["ports"]}
    assert len(host_ports) == 3
    assert "--logits-processors llm.vllm_plugin:StepAudioLogitsProcessor" in (ROOT / "docs" / "scaling.md").read_text()


# ------------------------------------------------------------------------------------------ requirements

def _requirement_lines(name: str) -> list[str]:
    lines = (ROOT / name).read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def test_gpu_requirements_differ_from_the_runtime_ones_only_in_onnxruntime():
    cpu, gpu = _requirement_lines("requirements.txt"), _requirement_lines("requirements-gpu.txt")
    assert len(cpu) == len(gpu)
    changed = [(a, b) for a, b in zip(cpu, gpu) if a != b]
    assert len(changed) == 1, changed
    (cpu_line, gpu_line), = changed
    assert cpu_line.startswith("onnxruntime==") and gpu_line == "onnxruntime-gpu[cuda,cudnn]==1.31.1"


# ------------------------------------------------------------------------------------------ docs

def test_configuration_doc_is_generated_from_the_current_settings(capsys):
    assert gen.main(["--check"]) == 0, "run: python scripts/gen_config_doc.py"
    rows = [line for line in (ROOT / "docs" / "configuration.md").read_text().splitlines() if line.startswith("| `--")]
    listed = {re.match(r"\| `([^`]+)` \| `([^`]+)`", row).groups() for row in rows}
    assert listed == {("--" + f.name.replace("_", "-"), ENV_PREFIX + f.name.upper()) for f in dataclasses.fields(Settings)}


def test_config_doc_generator_repairs_a_stale_table(tmp_path, capsys):
    doc = tmp_path / "configuration.md"
    original = (ROOT / "docs" / "configuration.md").read_text()
    doc.write_text(original.replace("| `--port` |", "| `--prot` |"))
    assert gen.main(["--check", "--doc", str(doc)]) == 1
    assert gen.main(["--doc", str(doc)]) == 0 and doc.read_text() == original
    doc.write_text("no markers here\n")
    assert gen.main(["--doc", str(doc)]) == 2


# ------------------------------------------------------------------------------------------ download_models

def _fill(model_root: Path, sparse_known_sizes: bool = True) -> dict[str, bytes]:
    """Write every key file (first option) of both repos; returns {repo-relative path: content}."""
    written = {}
    for repo in dl.default_repos():
        for name in repo.key_files:
            path = model_root / repo.dirname / name.split("|")[0]
            path.parent.mkdir(parents=True, exist_ok=True)
            size = repo.known_sizes.get(name)
            if size and sparse_known_sizes:
                with open(path, "wb") as handle:
                    handle.truncate(size)  # sparse: the real size without the disk space
            else:
                content = f"{repo.dirname}/{name} weights".encode()
                path.write_bytes(content)
                written[f"{repo.dirname}/{name.split('|')[0]}"] = content
    return written


def _problems(model_root: Path, remote_by_dir: dict | None = None, **kw) -> list[str]:
    out = []
    for repo in dl.default_repos():
        remote = None if remote_by_dir is None else remote_by_dir.get(repo.dirname, {})
        out += [str(p) for p in dl.check_folder(model_root, repo, remote, **kw)]
    return out


def test_a_complete_folder_passes_and_satisfies_the_engine(tmp_path):
    from tts_engine.select import missing_model_files

    _fill(tmp_path)
    assert _problems(tmp_path) == []
    assert missing_model_files(Settings(model_root=tmp_path)) == []
    assert (tmp_path / "Step-Audio-Tokenizer" / "speech_tokenizer_v1.onnx").stat().st_size == 522_625_011


def test_missing_empty_and_wrong_size_files_are_named(tmp_path):
    _fill(tmp_path)
    tok, decoder = tmp_path / "Step-Audio-Tokenizer", tmp_path / "Step-Audio-EditX" / "CosyVoice-300M-25Hz"
    (decoder / "campplus.onnx").unlink()
    (decoder / "hift.pt").write_bytes(b"")
    with open(tok / "speech_tokenizer_v1.onnx", "r+b") as handle:
        handle.truncate(1000)
    assert sorted(_problems(tmp_path)) == [
        "Step-Audio-EditX/CosyVoice-300M-25Hz/campplus.onnx: missing",
        "Step-Audio-EditX/CosyVoice-300M-25Hz/hift.pt: empty file (an interrupted download?)",
        "Step-Audio-Tokenizer/speech_tokenizer_v1.onnx: 1,000 bytes, expected 522,625,011",
    ]


def test_an_alternative_file_name_is_accepted(tmp_path):
    _fill(tmp_path)
    decoder = tmp_path / "Step-Audio-EditX" / "CosyVoice-300M-25Hz"
    (decoder / "flow.pt").rename(decoder / "flow.safetensors")
    assert _problems(tmp_path) == []
    (decoder / "flow.safetensors").unlink()
    assert _problems(tmp_path) == ["Step-Audio-EditX/CosyVoice-300M-25Hz/flow.pt: missing (or flow.safetensors)"]


def _siblings_for(model_root: Path, dirname: str, lfs: set[str]) -> list[RepoSibling]:
    """Hub-style metadata for what is on disk now, sizes and SHA-256 computed here with hashlib."""
    siblings = []
    for path in sorted(p for p in (model_root / dirname).rglob("*") if p.is_file()):
        rel, data = path.relative_to(model_root / dirname).as_posix(), path.read_bytes()
        info = BlobLfsInfo(size=len(data), sha256=hashlib.sha256(data).hexdigest(), pointer_size=134) if rel in lfs else None
        siblings.append(RepoSibling(rfilename=rel, size=len(data), lfs=info))
    return siblings


def test_hub_metadata_checks_sizes_checksums_and_unlisted_files(tmp_path):
    written = _fill(tmp_path, sparse_known_sizes=False)  # the hub's size wins over the built-in one
    editx = tmp_path / "Step-Audio-EditX"
    (editx / "model-00001-of-00002.safetensors").write_bytes(b"shard one")
    lfs = {"CosyVoice-300M-25Hz/flow.pt", "model-00001-of-00002.safetensors", "speech_tokenizer_v1.onnx"}
    remote = {d: dl.remote_files_from_siblings(_siblings_for(tmp_path, d, lfs))
              for d in ("Step-Audio-Tokenizer", "Step-Audio-EditX")}
    assert remote["Step-Audio-EditX"]["CosyVoice-300M-25Hz/flow.pt"].sha256 is not None
    assert remote["Step-Audio-EditX"]["config.json"].sha256 is None
    assert _problems(tmp_path, remote) == []

    remote["Step-Audio-EditX"]["model-00002-of-00002.safetensors"] = dl.RemoteFile("model-00002-of-00002.safetensors", 9, "0" * 64)
    (editx / "CosyVoice-300M-25Hz" / "flow.pt").write_bytes(b"X" + (editx / "CosyVoice-300M-25Hz" / "flow.pt").read_bytes()[1:])
    (editx / "model-00001-of-00002.safetensors").write_bytes(b"shard 0ne")  # same size, other bytes
    problems = _problems(tmp_path, remote)
    assert len(problems) == 2
    assert problems[0].startswith("Step-Audio-EditX/CosyVoice-300M-25Hz/flow.pt: SHA-256 ")
    assert problems[1] == "Step-Audio-EditX/model-00002-of-00002.safetensors: missing (listed on the hub)"
    # Non-key weight files are hashed only on request.
    assert any(p.startswith("Step-Audio-EditX/model-00001-of-00002.safetensors: SHA-256")
               for p in _problems(tmp_path, remote, hash_all=True))
    (editx / "config.json").write_bytes(b"{}")
    expected = len(written["Step-Audio-EditX/config.json"])
    assert _problems(tmp_path, remote)[0] == f"Step-Audio-EditX/config.json: 2 bytes, expected {expected} (hub)"


def test_unreachable_hub_is_a_clear_oserror(monkeypatch):
    # A hub on a local port nobody listens on: the client's connection error (not an OSError since
    # huggingface_hub moved to httpx) must come out as the script's OSError naming the repository.
    from huggingface_hub import constants

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    with pytest.raises(OSError, match="could not read the file list of stepfun-ai/Step-Audio-EditX from the hub"):
        dl.fetch_hub_metadata("stepfun-ai/Step-Audio-EditX", None)
    with pytest.raises(OSError, match="could not resolve the current commit of stepfun-ai/Step-Audio-EditX"):
        dl.resolve_commit(dataclasses.replace(dl.default_repos()[1], commit=None), Path("/nonexistent"), None)


def test_cli_dry_run_check_only_and_offline_download(tmp_path, capsys, monkeypatch):
    (tmp_path / "hashes.json").write_text("{}")  # the fake weights below are not upstream's
    monkeypatch.setattr(dl, "HASHES_FILE", tmp_path / "hashes.json")
    root = tmp_path / "models"
    assert dl.main(["--dry-run", "--model-root", str(root)]) == 0
    out = capsys.readouterr().out
    assert "stepfun-ai/Step-Audio-Tokenizer" in out and "stepfun-ai/Step-Audio-EditX" in out and not root.exists()

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert dl.main(["--model-root", str(root)]) == 2
    assert "HF_HUB_OFFLINE" in capsys.readouterr().err and not root.exists()

    assert dl.main(["--check-only", "--model-root", str(root)]) == 1
    assert "Step-Audio-EditX/config.json: missing" in capsys.readouterr().out
    _fill(root)
    monkeypatch.setenv("STUDIO_MODEL_ROOT", str(root))  # the studio's own setting is the default root
    assert dl.main(["--check-only"]) == 0
    assert "are complete" in capsys.readouterr().out


def test_pins_manifest_and_upstream_hashes_catch_changed_files(tmp_path, capsys, monkeypatch):
    shipped = json.loads(dl.HASHES_FILE.read_text())
    assert re.fullmatch(r"[0-9a-f]{40}", shipped["stepfun-ai/Step-Audio-Tokenizer"]["commit"])
    assert all(re.fullmatch(r"[0-9a-f]{64}", h) for repo in shipped.values() if isinstance(repo, dict)
               for h in repo.get("sha256", {}).values())
    tokenizer, editx = dl.default_repos()
    assert tokenizer.commit == shipped["stepfun-ai/Step-Audio-Tokenizer"]["commit"]
    assert dl.awq_repo().repo_id == "stepfun-ai/Step-Audio-EditX-AWQ-4bit"

    # Upstream hashes of our own making for the fake files (the real ones are checked the same way).
    _fill(tmp_path)   # the ONNX file has its published size (sparse)
    onnx = tmp_path / "Step-Audio-Tokenizer" / "speech_tokenizer_v1.onnx"
    onnx_sha = dl.sha256_file(onnx)
    assert onnx_sha == hashlib.sha256(b"\0" * onnx.stat().st_size).hexdigest()
    hashes = {"stepfun-ai/Step-Audio-Tokenizer": {"commit": "a" * 40, "sha256": {"speech_tokenizer_v1.onnx": onnx_sha}}}
    (tmp_path / "hashes.json").write_text(json.dumps(hashes))
    monkeypatch.setattr(dl, "HASHES_FILE", tmp_path / "hashes.json")
    tokenizer = dl.default_repos()[0]
    assert dl.verify_hashes(tmp_path, tokenizer) == ([], False)
    assert dl.main(["--write-manifest", "--model-root", str(tmp_path)]) == 0
    manifest = json.loads((tmp_path / "Step-Audio-Tokenizer" / dl.MANIFEST).read_text())
    assert manifest["commit"] == "a" * 40
    assert manifest["files"]["speech_tokenizer_v1.onnx"]["sha256"] == onnx_sha
    assert dl.main(["--check-only", "--offline", "--model-root", str(tmp_path)]) == 0
    capsys.readouterr()

    config = tmp_path / "Step-Audio-Tokenizer" / FUNASR_CONFIG
    config.write_bytes(config.read_bytes().replace(b"w", b"v"))   # same size, other bytes
    with open(onnx, "r+b") as handle:   # one byte changed, size kept
        handle.seek(1000)
        handle.write(b"!")
    (tmp_path / "Step-Audio-Tokenizer" / "extra.py").write_text("print('hi')")
    problems, had_manifest = dl.verify_hashes(tmp_path, tokenizer)
    assert had_manifest and {str(p) for p in problems} == {
        f"Step-Audio-Tokenizer/{FUNASR_CONFIG}: changed since download (SHA-256 differs from the manifest)",
        "Step-Audio-Tokenizer/extra.py: not in the manifest (added after download)",
        "Step-Audio-Tokenizer/speech_tokenizer_v1.onnx: changed since download (SHA-256 differs from the manifest)",
        f"Step-Audio-Tokenizer/speech_tokenizer_v1.onnx: SHA-256 {dl.sha256_file(onnx)[:16]}... differs from "
        f"upstream's {onnx_sha[:16]}...",
    }
    assert dl.main(["--check-only", "--offline", "--model-root", str(tmp_path)]) == 1
