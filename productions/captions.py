"""Captions of a render: SRT and WebVTT, naming each line's speaker.

Owns: formatting ``Caption`` lists as SRT (``Speaker: text``) and WebVTT (``<v Speaker>text``). A
caption whose words are timed becomes several cues, one per short line (at most ``LINE_CHARS``
characters, broken also at pauses: ``quality.timestamps.caption_lines``), each at its words' times;
WebVTT cues also carry a timestamp before every word after the first (karaoke-style highlighting in
players that support it). A caption without timed words is one cue over its whole take.
Does not own: where segments and words lie (``productions.render`` measures that).

Times are converted to milliseconds, rounded to the nearest (both formats carry milliseconds; the
manifest keeps the samples and the words' seconds).
"""

from __future__ import annotations

from dataclasses import dataclass

from productions.model import Caption
from quality.content import is_chinese
from quality.timestamps import caption_lines

LINE_CHARS = 42           # the usual subtitle line limit


@dataclass(frozen=True)
class _Cue:
    id: str
    speaker: str
    start_ms: int
    end_ms: int
    words: tuple[tuple[int, str], ...]   # (start ms, text) of each word; one item for an untimed caption
    sep: str = " "                       # between words: none for Chinese

    @property
    def text(self) -> str:
        return _one_line(self.sep.join(t for _, t in self.words))


def _ms(sample: int, rate: int) -> int:
    return (sample * 1000 + rate // 2) // rate


def _clock(ms: int, sep: str) -> str:
    return f"{ms // 3600000:02d}:{ms // 60000 % 60:02d}:{ms // 1000 % 60:02d}{sep}{ms % 1000:03d}"


def _one_line(text: str) -> str:
    # A blank line would end the cue early, and "-->" would read as a timing line.
    return " ".join(text.split()).replace("-->", "->")


def _cues(captions: list[Caption] | tuple[Caption, ...]) -> list[_Cue]:
    cues = []
    for cap in captions:
        start, end = _ms(cap.start_sample, cap.sample_rate), _ms(cap.end_sample, cap.sample_rate)
        if not cap.words:
            cues.append(_Cue(cap.segment_id, cap.speaker, start, end, ((start, cap.text),)))
            continue
        lines = caption_lines(cap.words, max_chars=LINE_CHARS)
        for n, line in enumerate(lines, 1):
            line_start = start if n == 1 else round(line.start_s * 1000)
            line_end = end if n == len(lines) else round(lines[n].start_s * 1000)   # no gap between a take's lines
            words = tuple((max(round(w.start_s * 1000), line_start), w.text) for w in line.words)
            cues.append(_Cue(f"{cap.segment_id}-{n}", cap.speaker, line_start, max(line_end, line_start), words,
                             "" if is_chinese(cap.text) else " "))
    return cues


def to_srt(captions: list[Caption] | tuple[Caption, ...]) -> str:
    blocks = []
    for number, cue in enumerate(_cues(captions), 1):
        who = f"{cue.speaker}: " if cue.speaker else ""
        blocks.append(f"{number}\n{_clock(cue.start_ms, ',')} --> {_clock(cue.end_ms, ',')}\n{who}{cue.text}\n")
    return "\n".join(blocks)


def _vtt_escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def to_vtt(captions: list[Caption] | tuple[Caption, ...]) -> str:
    blocks = ["WEBVTT\n"]
    for cue in _cues(captions):
        if len(cue.words) > 1:    # a timestamp tag before each later word, inside the cue's span
            parts = [_vtt_escape(_one_line(cue.words[0][1]))]
            parts += [f"<{_clock(min(max(ms, cue.start_ms), cue.end_ms), '.')}>{_vtt_escape(_one_line(t))}"
                      for ms, t in cue.words[1:]]
            text = cue.sep.join(parts)
        else:
            text = _vtt_escape(cue.text)
        voice = f"<v {_vtt_escape(_one_line(cue.speaker))}>" if cue.speaker else ""
        blocks.append(f"{cue.id}\n{_clock(cue.start_ms, '.')} --> {_clock(cue.end_ms, '.')}\n{voice}{text}\n")
    return "\n".join(blocks)
