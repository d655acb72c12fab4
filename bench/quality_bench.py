"""Benchmark: what scoring every take costs, best-of-3 through the batcher, and the scorers' accuracy.

Part ``cost`` and ``batch`` build one take the way the real engine makes it, on the CPU with
seeded random weights of the shipped sizes: the Step1 LLM (``llm_bench.build_model``: hidden 3072,
48 heads in 4 groups, vocabulary 74752; ``--layers`` of the shipped 32, to fit a CPU run) through
``llm.native.NativeBackend`` (continuous batching), answering ``--seconds`` of speech (5 ids per
0.12 s, forced length), then the shipped-size CosyVoice decoder (``decoder_bench.build_folder``; its
CAM++ is the tests' tiny one) turning that many random valid audio tokens into 24 kHz audio
(random weights decode noise, so the LLM's random ids are replaced by valid ones of the same count).

``cost``: one take's generation time against the time to score it -- the signal checks, the content
check by the tokenizer folder's Paraformer (``tokenizer_bench.build_real_size``: real-size encoder,
its decoder cut to 1 block, so this side is underestimated), and the speaker check by CAM++
(the tiny fixture model: underestimated too; the real one is ~7 M parameters).
``batch``: best-of-3 through ``quality.gates.generate_gated`` (three takes started together; the
LLM rows share decode steps) against three sequential takes, interleaved, no scoring in either.
``asr``: the timed recognition the content check and word timestamps run (``tokenizer.asr``: funasr's
streaming loop run by the studio, keeping the CIF weights) against funasr's own ``generate`` (text only)
on the same real-size Paraformer and clip, interleaved: what the word times cost.
``accuracy``: the test models of tests/test_quality.py on eSpeak NG clips -- PocketSphinx (closed
vocabulary) WER for the right and a wrong text, Resemblyzer similarity for the same and a different
voice, and the share of word timestamps whose middle falls in the word's audible span.

    PYTHONPATH=$PWD .venv/bin/python bench/quality_bench.py [--part cost,batch,asr,accuracy] [--layers 2]
        [--seconds 3] [--repeats 3] [--steps 10] [--batch-what llm,whole]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from common import ROOT, clone_prompt, environment_header, inline, mixed_tokens, summary
from core.audio_io import Audio, load_audio, resample
from core.settings import FUNASR_SUBDIR
# Everything is imported before any work: a run takes many minutes, and the tree may change meanwhile.
from decoder.model import AudioDecoder
from decoder_bench import build_folder
from llm.backend import GenerationRequest
from llm.native import NativeBackend
from llm.sampling import SamplingConfig
from llm_bench import EOS, build_model
from preview.espeak import speak
from quality.content import content_error, score_content
from quality.engine_models import CamPlusEmbedder, ParaformerRecognizer
from quality.gates import Gates, generate_gated
from quality.report import QualityScorer
from quality.speaker import score_speaker
from quality.timestamps import word_timestamps
from testkit.quality_models import PocketSphinxRecognizer, ResemblyzerEmbedder
from tokenizer.asr import CHUNK_SIZE, DECODER_LOOK_BACK, ENCODER_LOOK_BACK, Transcriber
from tokenizer_bench import real_size_folder

FIXTURES = ROOT / "tests" / "fixtures"
IDS_PER_GROUP, SECONDS_PER_GROUP = 5, 0.12


class TakeMaker:
    """One take as the engine makes it: LLM ids through the batching backend, then token2wav."""

    def __init__(self, args, folder: Path) -> None:
        dims = argparse.Namespace(hidden=3072, intermediate=8192, heads=48, groups=4, layers=args.layers, vocab=74752)
        self.groups = max(1, int(round(args.seconds / SECONDS_PER_GROUP)))
        self.new_ids = self.groups * IDS_PER_GROUP
        self.prompt = clone_prompt(np.random.default_rng(0), args.prompt)
        config = SamplingConfig(max_length=len(self.prompt) + self.new_ids + 8, min_new_tokens=10**6)
        self.backend = NativeBackend(build_model(dims, torch.device("cpu"), torch.float32), None, config, EOS,
                                     max_rows=8, step_token_budget=max(512, 4 * len(self.prompt)))
        build_folder(folder)
        self.decoder = AudioDecoder.from_dir(folder, n_steps=args.steps)
        self.features = self.decoder.prompt_features(load_audio(FIXTURES / "prompt_22k.wav"))
        self.prompt_tokens = mixed_tokens(38, np.random.default_rng(1))
        self.mixed_tokens = mixed_tokens
        self.steps = args.steps

    def llm(self, seed: int) -> tuple[int, ...]:
        """The LLM part of a take: ``new_ids`` answer ids through the batching backend."""
        out = self.backend.submit(GenerationRequest(self.prompt, seed, max_new_tokens=self.new_ids)).result(3600)
        assert len(out.answer) == self.new_ids, len(out.answer)
        return out.answer

    def __call__(self, seed: int) -> Audio:
        self.llm(seed)
        tokens = self.mixed_tokens(self.groups, np.random.default_rng(seed))
        return self.decoder.token2wav(tokens, self.prompt_tokens, self.features, seed=seed, n_steps=self.steps)


def part_cost(args, maker: TakeMaker, tmp: Path) -> list[str]:
    folder = real_size_folder(tmp / "tok")
    scorer = QualityScorer(ParaformerRecognizer(Transcriber(folder / FUNASR_SUBDIR)), CamPlusEmbedder(maker.decoder.frontend))
    prompt = load_audio(FIXTURES / "prompt_22k.wav")
    text = " ".join(["word"] * int(args.seconds * 2.5))
    maker(999)                                         # warm-up: first touch of the weights
    scorer.score(maker(998), text, {"signal", "content", "speaker"}, scorer.reference(prompt))
    gen, parts = [], {"signal": [], "content": [], "speaker": [], "all": []}
    for rep in range(args.repeats):
        start = time.perf_counter()
        audio = maker(rep)
        gen.append((time.perf_counter() - start) * 1000.0)
        reference = scorer.reference(prompt)
        reference.embedding()                          # the prompt's embedding is shared by a request's takes
        for check in ("signal", "content", "speaker"):
            parts[check].append(scorer.score(audio, text, {check}, reference).score_ms)
        parts["all"].append(scorer.score(audio, text, {"signal", "content", "speaker"}, reference).score_ms)
    g = summary(gen)
    rows = [f"one take of {args.seconds:g} s ({maker.new_ids} LLM ids, {args.layers} of 32 layers, {args.steps} flow "
            f"steps): generation {inline(g, 0)} ms", "", "| scoring | median ms | share of generation (median) |",
            "|---|---:|---:|"]
    for name, values in parts.items():
        med = float(np.median(values))
        rows.append(f"| {name} | {med:.1f} | {100.0 * med / g['median']:.2f} % |")
    return rows


def part_asr(args, tmp: Path) -> list[str]:
    folder = real_size_folder(tmp / "asr")
    transcriber = Transcriber(folder / FUNASR_SUBDIR)
    clip = load_audio(FIXTURES / "prompt_22k.wav")
    samples = np.ascontiguousarray(resample(clip.samples, clip.sample_rate, 16000), dtype=np.float32)
    auto = transcriber._model()

    def generate() -> None:
        auto.generate(input=samples, cache={}, is_final=True, chunk_size=list(CHUNK_SIZE),
                      encoder_chunk_look_back=ENCODER_LOOK_BACK, decoder_chunk_look_back=DECODER_LOOK_BACK,
                      disable_pbar=True)

    generate()
    transcriber.transcribe(clip)                       # warm-up both
    timed, plain, words = [], [], 0
    for _ in range(args.repeats):
        start = time.perf_counter()
        words = len(transcriber.transcribe(clip).words)
        timed.append((time.perf_counter() - start) * 1000.0)
        start = time.perf_counter()
        generate()
        plain.append((time.perf_counter() - start) * 1000.0)
    t, p = summary(timed), summary(plain)
    return [f"ASR of a {clip.duration:.2f} s clip, real-size Paraformer encoder (decoder cut to 1 block), "
            f"{args.repeats} interleaved runs", "", "| recognition | median ms | |", "|---|---:|---|",
            f"| funasr generate (text only) | {p['median']:.1f} | {inline(p, 1)} |",
            f"| studio loop (text + CIF word times, {words} timed words) | {t['median']:.1f} | {inline(t, 1)} |",
            f"| ratio (timed / text only) | {t['median'] / p['median']:.3f}x | |"]


def part_batch(args, maker: TakeMaker) -> list[str]:
    scorer, gates = QualityScorer(), Gates(checks=frozenset(), candidates=3)
    if "whole" in args.batch_what:   # warm-up: first touch of the weights
        maker(999)
    else:
        maker.llm(999)
    rows = [f"best-of-3 ({maker.new_ids} LLM ids per take, {args.layers} of 32 layers, {args.steps} flow steps):", "",
            "| part | best-of-3 through the batcher, ms | three sequential takes, ms | speed-up (median) |",
            "|---|---|---|---:|"]
    for name, take in (("LLM only", maker.llm), ("whole take (LLM + decoder)", maker)):
        if (take is maker) and "whole" not in args.batch_what or (take is not maker) and "llm" not in args.batch_what:
            continue
        best, seq = [], []
        for rep in range(args.repeats):              # interleaved, so load from other jobs hits both alike
            start = time.perf_counter()
            generate_gated(take, lambda a: Audio(np.zeros(1, np.float32), 24000), "", gates, scorer, seed=100 * rep)
            best.append((time.perf_counter() - start) * 1000.0)
            start = time.perf_counter()
            for i in range(3):
                take(100 * rep + i)
            seq.append((time.perf_counter() - start) * 1000.0)
        b, s = summary(best), summary(seq)
        rows.append(f"| {name} | {inline(b, 0)} | {inline(s, 0)} | {s['median'] / b['median']:.2f}x |")
    return rows


def part_accuracy() -> list[str]:
    sentences = ("hello world this is a test", "please call me tomorrow morning", "open the door and turn on the light",
                 "the weather is nice today", "we will look at the studio", "thank you for calling")
    recognizer = PocketSphinxRecognizer(tuple({w for s in sentences for w in s.split()}))
    general = PocketSphinxRecognizer(None)

    def clip(text, voice="en-us", rate=150, pitch=50):
        s = speak(text, voice=voice, rate_wpm=rate, pitch=pitch)
        return Audio(s.samples * 0.5, s.sample_rate)

    right, wrong, right_general = [], [], []
    for voice in ("en-us", "en-us+m3"):
        for i, sentence in enumerate(sentences):
            audio = clip(sentence, voice)
            good = score_content(audio, sentence, recognizer)
            right.append(good.error)
            wrong.append(content_error(good.transcript, sentences[(i + 1) % len(sentences)])[1])
            right_general.append(score_content(audio, sentence, general).error)
    scorer = QualityScorer(embedder=ResemblyzerEmbedder())
    voices = [("en-us", 160, 35), ("en-us+f3", 175, 75), ("en-us+m3", 140, 50)]
    same, other = [], []
    for v in voices:
        reference = scorer.reference(clip("the quiet harbour woke slowly as the first boats went out", *v))
        for w in voices:
            sim = score_speaker(clip("thank you for calling, your order will arrive on thursday", *w), reference).similarity
            (same if w == v else other).append(sim)
    words, rate, hits, total = ("open", "door", "light", "morning", "studio", "weather"), 22050, 0, 0
    pieces, spans, at = [np.zeros(int(0.3 * rate), np.float32)], {}, 0.3
    for word in words:
        s = clip(word).samples
        loud = np.flatnonzero(np.abs(s) > np.abs(s).max() * 0.01)
        spans[word] = (at + loud[0] / rate, at + loud[-1] / rate)
        pieces += [s, np.zeros(int(0.5 * rate), np.float32)]
        at += len(s) / rate + 0.5
    for w in word_timestamps(Audio(np.concatenate(pieces), rate), recognizer):
        if w.text in spans:
            total += 1
            hits += spans[w.text][0] - 0.05 <= (w.start_s + w.end_s) / 2 <= spans[w.text][1] + 0.05
    return ["| scorer (test models, eSpeak NG clips) | figure |", "|---|---|",
            f"| PocketSphinx, closed vocabulary: WER right text (12 clips) | mean {np.mean(right):.2f}, max {np.max(right):.2f} |",
            f"| same transcripts against a wrong text | mean {np.mean(wrong):.2f}, min {np.min(wrong):.2f} |",
            f"| PocketSphinx, general language model: WER right text | mean {np.mean(right_general):.2f} |",
            f"| Resemblyzer: same voice (3 pairs) / different voice (6 pairs) | {np.mean(same):.3f} / {np.mean(other):.3f} "
            f"(lowest same {np.min(same):.3f}, highest different {np.max(other):.3f}) |",
            f"| word timestamps: middle inside the audible span (+-50 ms) | {hits} of {total} recognised "
            f"({len(words)} spoken) |"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", default="cost,batch,asr,accuracy")
    parser.add_argument("--layers", type=int, default=2, help="Step1 layers (32 shipped)")
    parser.add_argument("--seconds", type=float, default=3.0, help="speech per take")
    parser.add_argument("--prompt", type=int, default=200, help="LLM prompt ids (a clone prompt is ~200-600)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--batch-what", default="llm,whole", help="batch part: llm (the LLM alone), whole (+ decoder)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    parts = args.part.split(",")
    print(environment_header("cpu", "float32", [f"layers {args.layers}/32", f"take {args.seconds:g} s",
                                                 f"flow steps {args.steps}", f"repeats {args.repeats}"]))
    print(f"load at start: {' '.join(f'{x:.1f}' for x in os.getloadavg())}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if "cost" in parts or "batch" in parts:
            (tmp / "dec").mkdir()
            maker = TakeMaker(args, tmp / "dec")
            try:
                for name, fn in (("cost", lambda: part_cost(args, maker, tmp)), ("batch", lambda: part_batch(args, maker))):
                    if name in parts:
                        print("\n" + "\n".join(fn()), flush=True)
            finally:
                maker.backend.close()
        if "asr" in parts:
            print("\n" + "\n".join(part_asr(args, tmp)), flush=True)
        if "accuracy" in parts:
            print("\n" + "\n".join(part_accuracy()), flush=True)
    print(f"\nload at end: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
