"""Captions of a render: SRT and WebVTT, each cue at its segment's exact place and naming its speaker.

Owns: formatting ``Caption`` lists as SRT (``Speaker: text``) and WebVTT (``<v Speaker>text``).
Does not own: where segments lie (``productions.render`` measures that in samples).

Times are the sample positions converted to milliseconds, rounded to the nearest (both formats carry
milliseconds; the manifest keeps the samples).
"""

from __future__ import annotations

from productions.model import Caption


def _ms(sample: int, rate: int) -> int:
    return (sample * 1000 + rate // 2) // rate


def _clock(ms: int, sep: str) -> str:
    return f"{ms // 3600000:02d}:{ms // 60000 % 60:02d}:{ms // 1000 % 60:02d}{sep}{ms % 1000:03d}"


def _one_line(text: str) -> str:
    # A blank line would end the cue early, and "-->" would read as a timing line.
    return " ".join(text.split()).replace("-->", "->")


def to_srt(captions: list[Caption] | tuple[Caption, ...]) -> str:
    blocks = []
    for number, cap in enumerate(captions, 1):
        start, end = _ms(cap.start_sample, cap.sample_rate), _ms(cap.end_sample, cap.sample_rate)
        who = f"{cap.speaker}: " if cap.speaker else ""
        blocks.append(f"{number}\n{_clock(start, ',')} --> {_clock(end, ',')}\n{who}{_one_line(cap.text)}\n")
    return "\n".join(blocks)


def _vtt_escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def to_vtt(captions: list[Caption] | tuple[Caption, ...]) -> str:
    blocks = ["WEBVTT\n"]
    for cap in captions:
        start, end = _ms(cap.start_sample, cap.sample_rate), _ms(cap.end_sample, cap.sample_rate)
        text = _vtt_escape(_one_line(cap.text))
        voice = f"<v {_vtt_escape(_one_line(cap.speaker))}>" if cap.speaker else ""
        blocks.append(f"{cap.segment_id}\n{_clock(start, '.')} --> {_clock(end, '.')}\n{voice}{text}\n")
    return "\n".join(blocks)
