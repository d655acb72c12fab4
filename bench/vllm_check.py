"""GPU check of the vLLM backend: real ``vllm serve`` against the native Step1 backend on one tiny checkpoint.

What it does, in order (one line per check, PASS/FAIL; exit status 1 on any FAIL):

1. writes a tiny random Step1 checkpoint with ``llm.checkpoint.write_step1_checkpoint`` (real id layout:
   vocab 74752, so audio ids exist; head_dim 64, which vLLM's attention kernels support), a WordLevel
   ``tokenizer.json`` for it (only used with ``--with-tokenizer``), and its vLLM view (``llm.vllm_view``);
2. starts ``vllm serve`` on the view with this repository's plugin (``llm.vllm_view.serve_args``), waits for
   ``/health``, and saves one raw streamed answer to ``<out>/vllm_stream_sample.txt`` (compare its shape with
   ``testkit/vllm_stub.py``);
3. greedy parity on the golden prompts (``prompt_a``/``prompt_b`` of
   ``tests/fixtures/llm/golden_step1.safetensors``): vLLM at temperature 0 without the plugin vs a plain
   full-forward greedy loop of the native model; then through both backends with ``top_k=1`` and the
   plugin's repetition ban on (greedy after the ban);
4. a clone end to end through the studio (tiny model root, ``--llm-backend vllm --llm-url ...``);
5. requests/s and p50/p95 latency at 1, 8 and 32 concurrent clients, vLLM vs native, 64-token answers.

It needs a CUDA GPU and vLLM 0.33 (``pip install vllm==0.33.0`` in its own environment; vLLM pins torch
2.14 and transformers 5.x) plus this repository on ``PYTHONPATH``. Written without a GPU at hand: not run yet.

Run from the repository root: ``PYTHONPATH=$PWD python bench/vllm_check.py --out $OUT``.
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
sys.path.insert(0, str(ROOT))
GOLDEN = ROOT / "tests" / "fixtures" / "llm" / "golden_step1.safetensors"
TINY = {"model_type": "step1", "architectures": ["Step1ForCausalLM"], "hidden_size": 256, "intermediate_size": 512,
        "num_attention_heads": 4, "num_attention_groups": 2, "num_hidden_layers": 2, "vocab_size": 74752,
        "max_seq_len": 8192, "rms_norm_eps": 1e-5, "bos_token_id": 1, "eos_token_id": 3, "pad_token_id": 0,
        "torch_dtype": "bfloat16"}
EOS = (3,)

failures: list[str] = []


def check(name: str, ok: bool, detail: str = "") -> None:
    print(f"{'PASS' if ok else 'FAIL'} {name} {detail}".rstrip(), flush=True)
    if not ok:
        failures.append(name)


def write_checkpoint(folder: Path) -> None:
    """The tiny checkpoint through the project's own Step1 code (issue 12's API)."""
    from llm.checkpoint import write_step1_checkpoint
    from llm.step1 import Step1Config

    config = Step1Config.from_dict(TINY) if hasattr(Step1Config, "from_dict") else Step1Config(
        **{k: v for k, v in TINY.items() if k not in ("model_type", "architectures", "torch_dtype")})
    write_step1_checkpoint(folder, config, seed=0)


def write_tokenizer(folder: Path, vocab: int) -> None:
    """A WordLevel tokenizer over the whole vocabulary (``<t{id}>``), for serving without --skip-tokenizer-init."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = {f"<t{i}>": i for i in range(vocab)}
    tokenizer = Tokenizer(models.WordLevel(words, unk_token="<t0>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<t1>", "eos_token": "<t3>", "pad_token": "<t0>"}))


def start_vllm(view: Path, port: int, out: Path, args) -> subprocess.Popen:
    from llm.vllm_view import serve_args

    argv = serve_args(view, host="127.0.0.1", port=port, gpu_memory_utilization=args.gpu_memory_utilization)
    argv[0:2] = [args.vllm, "serve"]
    if args.with_tokenizer:
        argv.remove("--skip-tokenizer-init")
    if args.eager:
        argv.append("--enforce-eager")
    argv += ["--dtype", args.dtype]
    print("starting:", shlex.join(argv), flush=True)
    log = open(out / "vllm_server.log", "w")
    process = subprocess.Popen(argv, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=log,
                               stderr=subprocess.STDOUT)
    import httpx

    deadline = time.monotonic() + args.start_timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"vllm serve exited ({process.returncode}); see {out / 'vllm_server.log'}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return process
        except httpx.HTTPError:
            pass
        time.sleep(1)
    process.kill()
    raise SystemExit(f"vllm serve did not become healthy in {args.start_timeout} s")


def raw_greedy(url: str, prompt: list[int], n: int, out: Path | None = None) -> list[int]:
    """Greedy ids straight from the server (temperature 0, no plugin, no EOS stop); optionally saves the stream."""
    import httpx

    body = {"prompt": prompt, "max_tokens": n, "temperature": 0.0, "ignore_eos": True, "stream": True,
            "return_token_ids": True, "stream_options": {"include_usage": True}}
    ids, lines = [], []
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as response:
        for line in response.iter_lines():
            lines.append(line)
            if line.startswith("data: {"):
                for choice in json.loads(line[6:]).get("choices", []):
                    ids += choice.get("token_ids") or []
    if out is not None:
        (out / "vllm_stream_sample.txt").write_text("\n".join(lines) + "\n")
    return ids


def native_greedy(model, prompt: list[int], n: int, device) -> list[int]:
    """Plain greedy decoding by full forward passes (independent of any backend's loop)."""
    import torch

    ids = torch.tensor([prompt], device=device)
    with torch.inference_mode():
        for _ in range(n):
            out = model(ids)
            logits = getattr(out, "logits", out[0] if isinstance(out, tuple) else out)
            ids = torch.cat([ids, logits[:, -1].float().argmax(-1, keepdim=True)], dim=1)
    return ids[0, len(prompt):].tolist()


def make_native_backend(folder: Path, device, dtype, sampling):
    """The native backend on ``folder`` (issue 12's ``llm.native.NativeBackend``; adapt here if its
    constructor differs)."""
    from llm.checkpoint import load_step1
    from llm.native import NativeBackend

    model = load_step1(folder, device, dtype)
    return NativeBackend(model, encode=lambda text: [ord(c) % 65536 for c in text], eos_ids=EOS, sampling=sampling)


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


def clone_through_studio(url: str, out: Path) -> None:
    import httpx

    from testkit.studio_server import speech_wav, start_studio
    from testkit.tiny_models import build_tiny_model_root

    root = Path(tempfile.mkdtemp(prefix="vllm-studio-"))
    models = build_tiny_model_root(root / "models")
    studio = start_studio(root, None, "--engine", "step-audio", "--model-root", str(models), "--llm-backend", "vllm",
                          "--llm-url", url, "--llm-max-new-tokens", "100")
    try:
        with httpx.Client(base_url=studio.url, timeout=300) as http:
            voice = http.post("/v1/audio/voices", files={"file": ("s.wav", speech_wav(), "audio/wav")},
                              data={"transcript": "a test clip"})
            check("studio stores a voice", voice.status_code == 201, voice.text[:200])
            speech = http.post("/v1/audio/speech", json={"input": "Hello from vLLM.", "voice": voice.json()["id"],
                                                         "response_format": "wav", "seed": 1})
            check("clone through the studio on vLLM", speech.status_code == 200 and len(speech.content) > 1000,
                  f"status {speech.status_code}, {len(speech.content)} bytes, X-Timings {speech.headers.get('X-Timings')}")
            check("/readyz with the vLLM backend", http.get("/readyz").status_code == 200)
            (out / "studio_clone.wav").write_bytes(speech.content)
    finally:
        studio.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "bench-out")))
    parser.add_argument("--vllm", default="vllm", help="the vllm executable")
    parser.add_argument("--port", type=int, default=8011)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.4)
    parser.add_argument("--start-timeout", type=float, default=600)
    parser.add_argument("--eager", action="store_true", help="pass --enforce-eager (faster start, slower decode)")
    parser.add_argument("--with-tokenizer", action="store_true", help="serve with the WordLevel tokenizer")
    parser.add_argument("--clients", default="1,8,32")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--skip-studio", action="store_true")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"),
                        help="for both vLLM and the native model (float32 rules out bfloat16 near-ties)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    import torch
    from safetensors.torch import load_file

    from llm.sampling import SamplingConfig
    from llm.vllm_backend import VLLMServerBackend
    from llm.vllm_view import write_vllm_view
    from common import git_sha

    device, dtype = torch.device("cuda"), getattr(torch, args.dtype)
    print(f"vllm_check git={git_sha()} gpu={torch.cuda.get_device_name(0)} torch={torch.__version__}", flush=True)
    work = Path(tempfile.mkdtemp(prefix="vllm-check-"))
    folder = work / "Step-Audio-EditX"
    write_checkpoint(folder)
    write_tokenizer(folder, TINY["vocab_size"])
    view = write_vllm_view(folder, work / "Step-Audio-EditX-vllm")
    server = start_vllm(view, args.port, args.out, args)
    url = f"http://127.0.0.1:{args.port}"
    try:
        golden = load_file(str(GOLDEN))
        prompts = {name: golden[name].tolist() for name in ("prompt_a", "prompt_b")}
        from llm.checkpoint import load_step1

        model = load_step1(folder, device, dtype)
        for i, (name, prompt) in enumerate(prompts.items()):
            theirs = raw_greedy(url, prompt, 16, args.out if i == 0 else None)
            ours = native_greedy(model, prompt, 16, device)
            check(f"greedy {name}: vLLM == native", theirs == ours, f"vllm {theirs} native {ours}")
        del model

        greedy = SamplingConfig(top_k=1, slot_mask=False)
        remote = VLLMServerBackend(url, lambda text: [ord(c) % 65536 for c in text], EOS, greedy)
        native = make_native_backend(folder, device, dtype, greedy)
        from llm.backend import GenerationRequest

        for name, prompt in prompts.items():
            a = remote.submit(GenerationRequest(tuple(prompt), seed=0, max_new_tokens=32)).result(timeout=120).answer
            b = native.submit(GenerationRequest(tuple(prompt), seed=0, max_new_tokens=32)).result(timeout=120).answer
            check(f"top-1 with the repetition ban {name}: vLLM == native", a == b, f"vllm {list(a)} native {list(b)}")
        remote.close()
        native.close()

        if not args.skip_studio:
            clone_through_studio(url, args.out)

        sampling = SamplingConfig(min_new_tokens=args.tokens)          # fixed-length answers for the timing
        backends = {"vllm": VLLMServerBackend(url, lambda t: [], EOS, sampling, read_timeout_s=300),
                    "native": make_native_backend(folder, device, dtype, sampling)}
        prompt = tuple(prompts["prompt_a"]) * 8
        print("| backend | clients | requests | requests/s | p50 ms | p95 ms |\n|---|---|---|---|---|---|", flush=True)
        for clients in (int(c) for c in args.clients.split(",")):
            for name, backend in backends.items():
                load_balance(backend, clients, clients, prompt, args.tokens)          # warm-up
                rate, latencies = load_balance(backend, clients, max(8, 2 * clients), prompt, args.tokens)
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
