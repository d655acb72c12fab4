"""Make the studio's bundled example prompts: synthetic eSpeak NG clips with their transcripts.

Writes ``examples/<name>.flac`` (16 kHz, 16-bit mono) and ``examples/examples.json``. The clips
are synthetic, made here from text with eSpeak NG (GPL-3.0 program; its output is not
covered by its licence), so the studio ships no recorded voices.

Usage: ``python scripts/make_examples.py [--out examples]``. Deterministic: the same eSpeak NG
version writes the same files.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import soundfile as sf

ROOT = Path(__file__).resolve().parent.parent

from core.audio_io import resample
from preview import espeak

RATE = 16000  # small files; the engines resample prompts themselves
# (file stem, eSpeak voice, rate wpm, pitch, transcript, suggested target text)
EXAMPLES = (
    ("en_low", "en-us", 165, 35, "The quiet harbour woke slowly as the first boats went out.",
     "Good morning. Today we will look at how the studio clones a voice."),
    ("en_high", "en-us+f3", 175, 65, "Please remember to water the plants before you leave.",
     "Thank you for calling. Your order will arrive on Thursday."),
    ("en_gb", "en", 160, 50, "A cup of tea and a good book make a fine afternoon.",
     "The weather tomorrow will be bright, with a light breeze from the west."),
)


def make(out: Path) -> list[dict]:
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for stem, voice, rate_wpm, pitch, transcript, target in EXAMPLES:
        speech = espeak.speak(transcript, voice=voice, rate_wpm=rate_wpm, pitch=pitch)
        samples = resample(speech.samples, speech.sample_rate, RATE)
        peak = float(np.abs(samples).max())
        samples = samples / peak * 0.8 if peak > 0 else samples  # same level for every example
        sf.write(out / f"{stem}.flac", samples, RATE, format="FLAC", subtype="PCM_16")
        rows.append({"audio": f"{stem}.flac", "transcript": transcript, "target": target,
                     "voice": f"eSpeak NG {espeak.version()} {voice}, {rate_wpm} wpm, pitch {pitch}"})
    (out / "examples.json").write_text(json.dumps(rows, indent=1, ensure_ascii=False) + "\n")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "examples", help="output folder (default: examples/)")
    args = parser.parse_args(argv)
    rows = make(args.out)
    total = sum((args.out / r["audio"]).stat().st_size for r in rows)
    print(f"wrote {len(rows)} examples ({total / 1024:.0f} KiB) to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
