"""GPU check of the vLLM backend: real ``vllm serve`` against the native Step1 backend on one tiny checkpoint.

What it does, in order (one line per check, PASS/FAIL; exit status 1 on any FAIL):

1. builds a tiny model root (``testkit.tiny_models.build_tiny_model_root``: tokenizer, decoder and the
   byte-level BPE ``tokenizer.json`` at the real special ids) and replaces its LLM by a random Step1 written with
   ``llm.checkpoint.write_step1_checkpoint`` (``TINY``: the real vocabulary of 74752, head_dim 64, which vLLM's
   attention kernels support), then writes its vLLM view (``llm.vllm_view.write_vllm_view``);
2. checks this script's plain greedy loop against the reference: on the golden folder ``tests/fixtures/llm``
   it must give ``greedy_a``/``greedy_b`` of ``golden_step1.safetensors`` exactly (float32, CPU);
3. starts ``vllm serve`` on the view with this repository's plugin (``llm.vllm_view.serve_args``), waits for
   ``/health``, and saves one raw streamed answer to ``<out>/vllm_stream_sample.txt`` (compare its shape with
   ``testkit/vllm_stub.py``);
4. greedy parity on the golden prompts (``prompt_a``/``prompt_b``): vLLM at temperature 0 without the plugin vs
   the plain greedy loop on the tiny checkpoint; then ``llm.vllm_backend.VLLMServerBackend`` vs
   ``llm.native.NativeBackend`` with ``top_k=1`` and the plugin's rules (repetition ban; ban + slot mask);
5. a clone end to end through the studio with the real engine (``StepAudioEngine`` on the tiny root,
   ``--llm-backend vllm --llm-url ...``): 200 with audio, ``/readyz`` 200;
6. requests/s and p50/p95 latency at 1, 8 and 32 concurrent clients, vLLM vs native, fixed-length answers.

It needs a CUDA GPU and vLLM 0.33 (``pip install vllm==0.33.0`` in its own environment; vLLM pins its own torch
and transformers) plus this repository on ``PYTHONPATH`` (the server loads ``llm.vllm_plugin`` from it).

``--dry-run`` needs neither: on the CPU in float32 it does steps 1-2, prints the native ids that vLLM must
reproduce in step 4 and the exact ``vllm serve`` and studio commands, then runs steps 5-6 against
``testkit.vllm_stub`` (a stand-in server with vLLM's response shapes and made-up ids) instead of vLLM, so
every code path of this script except vLLM itself is exercised. Its timings are the stub's, not vLLM's.

Run from the repository root: ``PYTHONPATH=$PWD python bench/vllm_check.py --out $OUT`` (GPU) or
``PYTHONPATH=$PWD .venv/bin/python bench/vllm_check.py --dry-run`` (anywhere).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GOLDEN_FOLDER = ROOT / "tests" / "fixtures" / "llm"
GOLDEN = GOLDEN_FOLDER / "golden_step1.safetensors"
# head_dim 256 / 4 = 64; 2 KV groups; the shipped vocabulary (text ids, audio ids, spare ids above 70656).
TINY = {"hidden_size": 256, "intermediate_size": 512, "num_attention_heads": 4, "num_attention_groups": 2,
        "num_hidden_layers": 2, "vocab_size": 74752}
GREEDY_TOKENS = 16

failures: list[str] = []


def check(name: str, ok: bool, detail: str = "") -> None:
    print(f"{'PASS' if ok else 'FAIL'} {name} {detail}".rstrip(), flush=True)
    if not ok:
        failures.append(name)


def build_model_root(work: Path) -> Path:
    """A tiny model root whose ``Step-Audio-EditX`` holds the ``TINY`` Step1 (tokenizer and decoder kept)."""
    from llm.checkpoint import INDEX, WEIGHTS, write_step1_checkpoint
    from llm.step1 import Step1Config
    from testkit.tiny_models import build_tiny_model_root

    models = build_tiny_model_root(work)
    folder = models / "Step-Audio-EditX"
    for stale in (WEIGHTS, INDEX):
        (folder / stale).unlink(missing_ok=True)
    write_step1_checkpoint(folder, Step1Config(**TINY), seed=0)
    return models


def golden_prompts() -> tuple[dict[str, list[int]], dict[str, list[int]]]:
    """(prompts, the reference's greedy ids on the golden folder), by name ``a``/``b``."""
    from safetensors.torch import load_file

    golden = load_file(str(GOLDEN))
    prompts = {n: golden[f"prompt_{n}"].tolist() for n in ("a", "b")}
    return prompts, {n: golden[f"greedy_{n}"].tolist() for n in ("a", "b")}


def native_greedy(model, prompt: list[int], n: int) -> list[int]:
    """Plain greedy decoding, a full forward pass over the whole sequence per id (no backend, no cache reuse,
    no sampling rules, no end id): what vLLM at temperature 0 with ``ignore_eos`` computes."""
    import torch

    device = model.lm_head.weight.device
    ids = list(prompt)
    with torch.inference_mode():
        for _ in range(n):
            cache = model.new_cache(1, len(ids))
            logits = model(torch.tensor([ids], device=device), torch.arange(len(ids), device=device)[None], cache,
                           torch.zeros(1, dtype=torch.long, device=device),
                           logits_at=torch.tensor([len(ids) - 1], device=device))
            ids.append(int(logits[0].float().argmax()))
    return ids[len(prompt):]


def answer_rules_for(folder: Path):
    """(tokenizer, sampling, end ids) of ``folder``, exactly as the engine reads them for either backend."""
    from llm.native import answer_rules
    from llm.step1 import Step1Config

    return answer_rules(folder, Step1Config.from_json(folder / "config.json"))


def native_backend(folder: Path, device, dtype, sampling, max_rows: int):
    """``llm.native.NativeBackend`` on ``folder`` with ``sampling`` (the folder's tokenizer and end ids)."""
    from llm.checkpoint import load_step1
    from llm.native import NativeBackend

    tokenizer, _, eos_ids = answer_rules_for(folder)
    model = load_step1(folder, device, dtype)
    return NativeBackend(model, tokenizer, sampling, eos_ids, max_rows=max_rows,
                         step_token_budget=max(512, max_rows + 1))


def remote_backend(folder: Path, url: str, sampling, read_timeout_s: float = 120.0):
    from llm.vllm_backend import VLLMServerBackend

    tokenizer, _, eos_ids = answer_rules_for(folder)
    return VLLMServerBackend(url, tokenizer.encode, eos_ids, sampling, read_timeout_s=read_timeout_s,
                             request_timeout_s=600.0)


def vllm_command(view: Path, port: int, args) -> list[str]:
    from llm.vllm_view import serve_args

    argv = serve_args(view, host="127.0.0.1", port=port, gpu_memory_utilization=args.gpu_memory_utilization)
    argv[0:2] = [args.vllm, "serve"]
    if args.with_tokenizer:          # the view links the folder's tokenizer.json; by default vLLM needs none
        argv.remove("--skip-tokenizer-init")
    if args.eager:
        argv.append("--enforce-eager")
    return argv + ["--dtype", args.dtype]


def start_server(argv: list[str], url: str, out: Path, timeout: float) -> subprocess.Popen:
    import httpx

    print("starting:", f"PYTHONPATH={shlex.quote(str(ROOT))}", shlex.join(argv), flush=True)
    log = open(out / "vllm_server.log", "w")
    process = subprocess.Popen(argv, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=log,
                               stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"vllm serve exited ({process.returncode}); see {out / 'vllm_server.log'}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return process
        except httpx.HTTPError:
            pass
        time.sleep(1)
    process.kill()
    raise SystemExit(f"vllm serve did not become healthy in {timeout} s")


def raw_greedy(url: str, prompt: list[int], n: int, out: Path | None = None) -> list[int]:
    """Greedy ids straight from the server (temperature 0, no plugin, no end id); optionally saves the stream."""
    import httpx

    body = {"prompt": prompt, "max_tokens": n, "temperature": 0.0, "ignore_eos": True, "stream": True,
            "return_token_ids": True, "stream_options": {"include_usage": True}}
    ids, lines = [], []
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=120) as response:
        for line in response.iter_lines():
            lines.append(line)
            if line.startswith("data: {"):
                for choice in json.loads(line[6:]).get("choices", []):
                    ids += choice.get("token_ids") or []
    if out is not None:
        (out / "vllm_stream_sample.txt").write_text("\n".join(lines) + "\n")
    return ids


def rule_variants():
    from llm.sampling import SamplingConfig

    return {"top-1 + repetition ban": SamplingConfig(top_k=1, slot_mask=False),
            "top-1 + repetition ban + slot mask": SamplingConfig(top_k=1, slot_mask=True)}


def backend_answers(backend, prompts: dict[str, list[int]], n: int) -> dict[str, list[int]]:
    from llm.backend import GenerationRequest

    return {name: list(backend.submit(GenerationRequest(tuple(p), seed=0, max_new_tokens=n)).result(timeout=300).answer)
            for name, p in prompts.items()}


def load_balance(backend, clients: int, requests: int, prompt: tuple[int, ...], n: int) -> tuple[float, list[float]]:
    from llm.backend import GenerationRequest

    def one(i: int) -> float:
        start = time.perf_counter()
        backend.submit(GenerationRequest(prompt, seed=i, max_new_tokens=n)).result(timeout=600)
        return (time.perf_counter() - start) * 1000.0

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        latencies = list(pool.map(one, range(requests)))
    return requests / (time.perf_counter() - start), latencies


def studio_flags(models: Path, url: str, device: str, dtype: str) -> list[str]:
    return ["--engine", "step-audio", "--model-root", str(models), "--device", device, "--dtype", dtype,
            "--llm-backend", "vllm", "--llm-url", url, "--llm-max-new-tokens", "100", "--flow-steps", "2"]


def clone_through_studio(work: Path, models: Path, url: str, out: Path, device: str, dtype: str) -> None:
    """The real engine with ``--llm-backend vllm --llm-url url`` behind the real app; one voice, one clone."""
    import httpx

    from testkit.studio_server import speech_wav, start_studio
    from tts_engine.step_audio import StepAudioEngine

    studio = start_studio(work / "studio", StepAudioEngine, *studio_flags(models, url, device, dtype))
    try:
        with httpx.Client(base_url=studio.url, timeout=300) as http:
            check("/readyz with the vLLM backend", http.get("/readyz").status_code == 200, http.get("/readyz").text)
            voice = http.post("/v1/audio/voices", files={"file": ("s.wav", speech_wav(), "audio/wav")},
                              data={"transcript": "a test clip"})
            check("studio stores a voice", voice.status_code == 201, voice.text[:200])
            speech = http.post("/v1/audio/speech", json={"input": "Hello from vLLM.", "voice": voice.json()["id"],
                                                         "response_format": "wav", "seed": 1})
            check("clone through the studio on the vLLM backend",
                  speech.status_code == 200 and len(speech.content) > 1000,
                  f"status {speech.status_code}, {len(speech.content)} bytes, X-Timings {speech.headers.get('X-Timings')}")
            (out / "studio_clone.wav").write_bytes(speech.content)
            lines = [line for line in http.get("/metrics").text.splitlines() if line.startswith("studio_llm_")]
            print("  /metrics: " + "; ".join(lines), flush=True)
    finally:
        studio.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "bench-out")))
    parser.add_argument("--dry-run", action="store_true",
                        help="CPU, no vLLM: build and check everything, print the commands, use the stub server")
    parser.add_argument("--vllm", default="vllm", help="the vllm executable")
    parser.add_argument("--port", type=int, default=8011)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.4)
    parser.add_argument("--start-timeout", type=float, default=600)
    parser.add_argument("--eager", action="store_true", help="pass --enforce-eager (faster start, slower decode)")
    parser.add_argument("--with-tokenizer", action="store_true",
                        help="let vLLM load the folder's tokenizer (drops --skip-tokenizer-init)")
    parser.add_argument("--clients", default=None, help="concurrency levels (default 1,8,32; dry run 1,4)")
    parser.add_argument("--tokens", type=int, default=None, help="answer length for the timing (default 64; dry run 8)")
    parser.add_argument("--skip-studio", action="store_true")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"),
                        help="for both vLLM and the native model (float32 rules out bfloat16 near-ties); "
                             "the dry run always uses float32")
    args = parser.parse_args()
    dry = args.dry_run
    clients_levels = [int(c) for c in (args.clients or ("1,4" if dry else "1,8,32")).split(",")]
    tokens = args.tokens or (8 if dry else 64)
    args.out.mkdir(parents=True, exist_ok=True)

    import torch

    from common import environment_header
    from llm.checkpoint import load_step1
    from llm.sampling import SamplingConfig
    from llm.vllm_view import write_vllm_view

    device = torch.device("cpu" if dry else "cuda")
    dtype = torch.float32 if dry else getattr(torch, args.dtype)
    if dry:
        torch.set_num_threads(min(2, torch.get_num_threads()))
    print(environment_header(device, dtype, ["vllm_check" + (" --dry-run" if dry else "")]), flush=True)

    # 1. the folder, its view
    work = Path(tempfile.mkdtemp(prefix="vllm-check-"))
    models = build_model_root(work)
    folder = models / "Step-Audio-EditX"
    view = write_vllm_view(folder, work / "Step-Audio-EditX-vllm")
    print(f"tiny Step1 {TINY} in {folder}; vLLM view {view}", flush=True)

    # 2. the greedy loop against the reference
    prompts, reference = golden_prompts()
    golden_model = load_step1(GOLDEN_FOLDER, "cpu", torch.float32)
    for name, prompt in prompts.items():
        ours = native_greedy(golden_model, prompt, GREEDY_TOKENS)
        check(f"greedy loop on the golden folder, prompt_{name} == reference greedy_{name}", ours == reference[name],
              f"ours {ours} reference {reference[name]}")
    del golden_model

    model = load_step1(folder, device, dtype)
    expected = {name: native_greedy(model, prompt, GREEDY_TOKENS) for name, prompt in prompts.items()}
    del model
    natives = {}
    for label, sampling in rule_variants().items():
        backend = native_backend(folder, device, dtype, sampling, max_rows=2)
        natives[label] = backend_answers(backend, prompts, 32)
        backend.close()

    url = f"http://127.0.0.1:{args.port}"
    argv = vllm_command(view, args.port, args)
    if dry:
        for name, ids in expected.items():
            print(f"native plain greedy prompt_{name} ({GREEDY_TOKENS} ids; vLLM at temperature 0 must match): {ids}")
        for label, answers in natives.items():
            for name, ids in answers.items():
                print(f"native backend {label} prompt_{name} ({len(ids)} ids): {ids}")
        print("vllm serve command:", f"PYTHONPATH={shlex.quote(str(ROOT))}", shlex.join(argv), flush=True)
        print("studio command:", shlex.join([sys.executable, "app.py", *studio_flags(models, url, "cuda", args.dtype)]),
              flush=True)

    # 3. the server: real vLLM, or the stub on a dry run
    if dry:
        from testkit.studio_server import free_port
        from testkit.vllm_stub import StubProcess

        stub = StubProcess(free_port()).start()
        url, server, server_name = stub.url, stub.process, "stub"
        stub.configure(answer_len=10)          # two whole 2:3 groups for the clone; the timing sets its own
    else:
        server, server_name = start_server(argv, url, args.out, args.start_timeout), "vllm"
    try:
        if not dry:
            # 4. parity
            for i, (name, prompt) in enumerate(prompts.items()):
                theirs = raw_greedy(url, prompt, GREEDY_TOKENS, args.out if i == 0 else None)
                check(f"greedy prompt_{name}: vLLM == native", theirs == expected[name],
                      f"vllm {theirs} native {expected[name]}")
            for label, sampling in rule_variants().items():
                remote = remote_backend(folder, url, sampling)
                answers = backend_answers(remote, prompts, 32)
                remote.close()
                for name in prompts:
                    check(f"{label} prompt_{name}: vLLM backend == native backend",
                          answers[name] == natives[label][name],
                          f"vllm {answers[name]} native {natives[label][name]}")

        # 5. a clone through the studio
        if not args.skip_studio:
            clone_through_studio(work, models, url, args.out, device.type, str(dtype).replace("torch.", ""))

        # 6. throughput and latency, fixed-length answers
        if dry:
            stub.configure(answer_len=tokens)
        sampling = SamplingConfig(min_new_tokens=tokens, max_new_tokens=tokens)
        backends = {server_name: remote_backend(folder, url, sampling, read_timeout_s=300),
                    "native": native_backend(folder, device, dtype, sampling, max_rows=max(clients_levels))}
        prompt = tuple(prompts["a"]) * 8
        print(f"{len(prompt)}-id prompt, {tokens}-id answers")
        print("| backend | clients | requests | requests/s | p50 ms | p95 ms |\n|---|---|---|---|---|---|", flush=True)
        for clients in clients_levels:
            for name, backend in backends.items():
                load_balance(backend, clients, clients, prompt, tokens)          # warm-up
                rate, latencies = load_balance(backend, clients, max(8, 2 * clients), prompt, tokens)
                p50, p95 = (float(torch.tensor(latencies).quantile(q)) for q in (0.5, 0.95))
                print(f"| {name} | {clients} | {len(latencies)} | {rate:.2f} | {p50:.0f} | {p95:.0f} |", flush=True)
        for backend in backends.values():
            backend.close()
    finally:
        server.terminate()
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
    print(f"{'FAILED: ' + ', '.join(failures) if failures else 'all checks passed'}", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
