"""Turning request text into what eSpeak NG should say, and in which voice.

Owns: reading a leading language tag (``[Cantonese]`` ...), detecting the script of untagged text
(Han -> Mandarin, kana -> Japanese, Hangul -> Korean, else English), removing paralinguistic and
other bracketed tags that the preview cannot perform, and splitting long text into sentences so
that progress can be reported.
Does not own: synthesis (``preview.espeak``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# Language tag -> (eSpeak voice, note when the preview only approximates it).
LANGUAGE_VOICES: dict[str, tuple[str, str]] = {
    "[Cantonese]": ("yue", ""),
    "[Japanese]": ("ja", ""),
    "[Korean]": ("ko", ""),
    "[Sichuanese]": ("cmn", "eSpeak NG has no Sichuanese voice; the preview speaks Mandarin"),
}
ENGLISH, MANDARIN, JAPANESE, KOREAN = "en-us", "cmn", "ja", "ko"

_TAG = re.compile(r"\[[A-Za-z][A-Za-z _-]{0,40}\]")   # tags may hold a space: [clears throat]
_HAN = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
_KANA = re.compile(r"[\u3040-\u30ff]")
_HANGUL = re.compile(r"[\uac00-\ud7af\u1100-\u11ff]")
# A sentence ends at . ! ? (followed by space) or at CJK full stops, or at a line break.
_SENTENCE_END = re.compile(r"(?<=[.!?;])\s+|(?<=[。！？；])|\n+")
_MAX_CHUNK = 240   # characters per eSpeak call; longer sentences are split at commas or spaces


@dataclass(frozen=True)
class SpokenText:
    """Text ready for eSpeak: the sentences to say, the voice, what was dropped and why."""

    sentences: tuple[str, ...]
    voice: str
    removed_tags: tuple[str, ...] = ()
    note: str = ""

    @property
    def text(self) -> str:
        """What the audio says (the next edit's ``audio_text``)."""
        joiner = "" if self.voice in (MANDARIN, "yue", JAPANESE) else " "
        return joiner.join(self.sentences)


def detect_voice(text: str) -> str:
    """The eSpeak voice for untagged ``text``: by script, English when there is no CJK."""
    if _KANA.search(text):
        return JAPANESE
    if _HANGUL.search(text):
        return KOREAN
    if _HAN.search(text):
        return MANDARIN
    return ENGLISH


def _no_split_inside_word(sentence: str, cut: int) -> int:
    """``cut`` moved left so that it does not fall inside a Latin word or a pinyin syllable (``guo4``);
    between two syllables (a tone digit, then a letter) is a fine place."""
    start = cut
    while 0 < cut < len(sentence):
        before, after = sentence[cut - 1], sentence[cut]
        if not (before.isascii() and before.isalnum() and after.isascii() and after.isalnum()) \
                or (before.isdigit() and after.isalpha()):
            break
        cut -= 1
    return cut if cut > 0 else start


def split_sentences(text: str, max_chars: int = _MAX_CHUNK) -> list[str]:
    """Sentences of ``text``, each at most ``max_chars`` (split further at commas, then spaces)."""
    pieces = []
    for sentence in _SENTENCE_END.split(text):
        sentence = sentence.strip()
        while len(sentence) > max_chars:
            cut = max(sentence.rfind(mark, 0, max_chars) for mark in (",", "，", "、", " "))
            cut = cut + 1 if cut > 0 else _no_split_inside_word(sentence, max_chars)
            pieces.append(sentence[:cut].strip())
            sentence = sentence[cut:].strip()
        if sentence:
            pieces.append(sentence)
    return [p for p in pieces if p]


def prepare(text: str) -> SpokenText:
    """Read tags and script from request text.

    A leading language tag picks the voice (see :data:`LANGUAGE_VOICES`); every other bracketed
    tag (``[Laughter]``, ``[Breathing]`` ...) is removed, since eSpeak would read it as a word.

    Returns:
        :class:`SpokenText`; its ``sentences`` may be empty when the text was only tags.
    """
    stripped = text.strip()
    voice, note = "", ""
    for tag, (tag_voice, tag_note) in LANGUAGE_VOICES.items():
        if stripped.startswith(tag):
            voice, note = tag_voice, tag_note
            stripped = stripped[len(tag):]
            break
    removed = tuple(_TAG.findall(stripped))
    spoken = re.sub(r"[ \t]{2,}", " ", _TAG.sub(" ", stripped)).strip()
    if not voice:
        voice = detect_voice(spoken)
    if removed:
        extra = f"the preview cannot perform {', '.join(dict.fromkeys(removed))}; removed from the text"
        note = f"{note}; {extra}" if note else extra
    return SpokenText(tuple(split_sentences(spoken)), voice, removed, note)
