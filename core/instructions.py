"""Free-form speaking instructions ("whisper, sad, a bit slower" / "耳语，难过，慢一点") as an edit chain.

Owns: splitting an instruction into clauses, mapping each clause to one edit (type and option) from
the real option lists in ``core.edit_options`` (English names and a few English synonyms, the
Chinese names), repeat counts ("whisper x2", "耳语两次"), the chain's limits, its ASCII header form,
and the message listing what is understood when a clause cannot be mapped.
Does not own: running the edits (the caller applies them in order with ``Engine.edit``), checking
them against one engine's capabilities (``tts_engine.contract.validate_edit``).

The mapping is a lookup, not a language model: a clause maps only when, after dropping filler words
("a bit", "please", "voice", "一点", "语气" ...), what is left names exactly one option.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import quote

from core.edit_options import CHINESE_NAMES, EMOTIONS, SPEEDS, STYLES
from core.errors import InputError

MAX_INSTRUCTION_CHARS = 500
MAX_CHAIN_STEPS = 8          # every step is a full edit pass; this bounds one request's work
MAX_REPEAT = 5

# Words that carry no choice of edit. "more" is handled apart (it is part of "more faster").
_FILLERS = frozenset("""a an the bit little tiny slightly somewhat rather please make makes it its sound sounds
    speak speaking talk talking say said read reading in with voice tone style manner way be more and also
    then like kind of sort just to as emotion emotional""".split())
_INTENSIFIERS = frozenset("much lot way far very really significantly even considerably".split())
_ZH_FILLERS = ("一点儿", "一点", "一些", "有点儿", "有点", "稍微", "稍稍", "更加", "更", "请", "用", "地说", "说话",
               "的", "地", "语气", "风格", "声音", "情绪", "一下", "些", "再", "要", "得")
_ZH_INTENSIFIERS = ("很多", "非常", "特别", "大大", "许多", "多了", "很")
_ZH_COUNTS = {"一": 1, "两": 2, "二": 2, "三": 3, "四": 4, "五": 5}

_EN_SYNONYMS: dict[tuple[str, str | None], tuple[str, ...]] = {
    ("emotion", "happy"): ("happier", "happily", "joyful", "cheerful", "cheerfully", "glad", "happiness"),
    ("emotion", "angry"): ("angrier", "angrily", "mad", "furious", "anger"),
    ("emotion", "sad"): ("sadder", "sadly", "sadness", "unhappy", "sorrowful"),
    ("emotion", "humour"): ("humor", "humorous", "humourous", "funny", "playful"),
    ("emotion", "confusion"): ("confused", "puzzled"),
    ("emotion", "disgusted"): ("disgust", "disgusting"),
    ("emotion", "empathy"): ("empathetic", "empathic", "sympathetic"),
    ("emotion", "embarrass"): ("embarrassed", "embarrassment"),
    ("emotion", "fear"): ("afraid", "scared", "fearful", "frightened", "fearfully"),
    ("emotion", "surprised"): ("surprise", "surprising"),
    ("emotion", "excited"): ("excitement", "excitedly", "enthusiastic"),
    ("emotion", "depressed"): ("depression", "gloomy"),
    ("emotion", "coldness"): ("cold", "coldly", "indifferent"),
    ("emotion", "admiration"): ("admiring", "admiringly"),
    ("emotion", "remove"): ("neutral", "no emotion", "without emotion", "remove emotion", "flat"),
    ("style", "whisper"): ("whispering", "whispered", "whispers", "whisperingly"),
    ("style", "child"): ("childlike", "childish", "kid"),
    ("style", "older"): ("old", "elderly", "old man", "old woman"),
    ("style", "girl"): ("girlish", "girly"),
    ("style", "act_coy"): ("act coy", "coy", "coyly", "cute"),
    ("style", "story"): ("storytelling", "storyteller", "narrator"),
    ("style", "news"): ("newscaster", "news anchor", "newsreader"),
    ("style", "program"): ("presenter", "host", "show host"),
    ("style", "advertising"): ("advert", "commercial", "advertisement"),
    ("style", "roar"): ("roaring",),
    ("style", "murmur"): ("murmuring", "mumble", "mumbling"),
    ("style", "shout"): ("shouting", "yell", "yelling"),
    ("style", "deeply"): ("deep",),
    ("style", "loudly"): ("loud",),
    ("style", "exaggerated"): ("exaggerate", "dramatic", "dramatically"),
    ("style", "gentle"): ("gently", "soft", "softly"),
    ("style", "serious"): ("seriously", "solemn", "solemnly"),
    ("style", "recite"): ("reciting", "recitation"),
    ("style", "chat"): ("chatty", "casual", "casually", "conversational"),
    ("style", "comfort"): ("comforting", "reassuring"),
    ("style", "authority"): ("authoritative", "commanding"),
    ("style", "warm"): ("warmly",),
    ("style", "shy"): ("shyly", "timid"),
    ("style", "sweet"): ("sweetly",),
    ("style", "arrogant"): ("arrogantly",),
    ("style", "ethereal"): ("dreamy", "airy"),
    ("style", "soulful"): ("heartfelt",),
    ("style", "vivid"): ("lively",),
    ("style", "remove"): ("no style", "plain", "remove style", "without style"),
    ("denoise", None): ("denoise", "remove noise", "reduce noise", "noise reduction", "clean up", "no noise"),
    ("vad", None): ("vad", "remove silence", "trim silence", "cut silence", "remove silences", "remove pauses"),
}
_SPEED_WORDS = {"faster": "faster", "quicker": "faster", "fast": "faster", "quickly": "faster",
                "speed up": "faster", "hurry": "faster",
                "slower": "slower", "slow": "slower", "slowly": "slower", "slow down": "slower"}


@dataclass(frozen=True)
class EditStep:
    """One edit of a chain: ``edit_type`` with ``edit_info`` (None for denoise and vad)."""

    edit_type: str
    edit_info: str | None = None

    @property
    def label(self) -> str:
        return f"{self.edit_type}:{self.edit_info}" if self.edit_info else self.edit_type


def _lookup() -> dict[str, EditStep]:
    table: dict[str, EditStep] = {}
    for kind, options in (("emotion", EMOTIONS), ("style", STYLES)):
        for option in options:
            if option != "remove":  # "remove" alone is ambiguous: emotion or style
                table[option] = table[option.replace("_", " ")] = EditStep(kind, option)
    for (kind, option), words in _EN_SYNONYMS.items():
        for word in words:
            table[word] = EditStep(kind, option)
    for (kind, option), names in CHINESE_NAMES.items():
        for name in names:
            table[name] = EditStep(kind, option or None)
    return table


_TABLE = _lookup()
_SPLIT = re.compile(r"[,;，；、。！!？?\n]+|\s+(?:and then|and|then|plus)\s+|然后|并且|同时|接着")
_REPEAT_EN = re.compile(r"\s*(?:[x×*]\s*([1-9])|\b(twice|thrice)\b|\b([1-9])\s*times)\s*$")
_REPEAT_ZH = re.compile(r"([1-9一两二三四五])\s*(?:次|遍)\s*$")


def _repeat(clause: str) -> tuple[str, int]:
    """(clause without its repeat count, count)."""
    m = _REPEAT_EN.search(clause)
    if m:
        count = int(m.group(1) or m.group(3)) if (m.group(1) or m.group(3)) else {"twice": 2, "thrice": 3}[m.group(2)]
        return clause[:m.start()].strip(), count
    m = _REPEAT_ZH.search(clause)
    if m:
        digit = m.group(1)
        return clause[:m.start()].strip(), int(digit) if digit.isdigit() else _ZH_COUNTS[digit]
    return clause, 1


def _map_english(clause: str) -> EditStep | None:
    words = re.findall(r"[a-z_]+", clause)
    if not words:
        return None
    literal = " ".join(words)
    for speed in SPEEDS:                          # the option names themselves, e.g. "more faster"
        if literal == speed:
            return EditStep("speed", speed)
    intense = any(w in _INTENSIFIERS for w in words)
    kept = " ".join(w for w in words if w not in _FILLERS and w not in _INTENSIFIERS)
    if kept in _SPEED_WORDS:
        base = _SPEED_WORDS[kept]
        return EditStep("speed", f"more {base}" if intense else base)
    return _TABLE.get(kept)


def _map_chinese(clause: str) -> EditStep | None:
    text = re.sub(r"\s+", "", clause)
    if text in _TABLE:
        return _TABLE[text]
    intense = any(w in text for w in _ZH_INTENSIFIERS)
    for word in _ZH_INTENSIFIERS + _ZH_FILLERS:
        text = text.replace(word, "")
    if text in _TABLE:
        step = _TABLE[text]
        if step.edit_type == "speed" and intense and not step.edit_info.startswith("more"):
            return EditStep("speed", f"more {step.edit_info}")
        return step
    return None


def understood() -> str:
    """What instructions can say, for error messages and documentation."""
    return ("emotions: " + ", ".join(o for o in EMOTIONS if o != "remove") + ", neutral; "
            "styles: " + ", ".join(o for o in STYLES if o != "remove") + ", plain; "
            "speed: faster, slower, much faster, much slower; denoise; remove silence; "
            "Chinese names such as 开心, 难过, 耳语, 慢一点, 降噪; separate edits with commas, "
            f"repeat one with 'x2' (at most {MAX_REPEAT})")


def parse_instructions(text: str | None) -> tuple[EditStep, ...]:
    """The edit chain an instruction asks for, in the order written (empty for an empty text).

    Raises:
        InputError: the text is too long, a clause maps to no option (the message quotes it and
            lists what is understood), a repeat count is out of range, or the chain is too long.
    """
    if text is None or not text.strip():
        return ()
    if len(text) > MAX_INSTRUCTION_CHARS:
        raise InputError(f"instructions are {len(text)} characters long; the limit is {MAX_INSTRUCTION_CHARS}")
    steps: list[EditStep] = []
    for raw in _SPLIT.split(text):
        clause = raw.strip().lower()
        if not clause:
            continue
        clause, count = _repeat(clause)
        if not 1 <= count <= MAX_REPEAT:
            raise InputError(f"instructions: {raw.strip()!r} repeats an edit {count} times; at most {MAX_REPEAT}")
        step = _map_chinese(clause) if re.search(r"[^\x00-\x7f]", clause) else _map_english(clause)
        if step is None:
            raise InputError(f"instructions: cannot map {raw.strip()!r} to an edit. Understood: {understood()}")
        steps.extend([step] * count)
    if len(steps) > MAX_CHAIN_STEPS:
        raise InputError(f"instructions ask for {len(steps)} edits; at most {MAX_CHAIN_STEPS} per request")
    return tuple(steps)


def chain_header(steps: tuple[EditStep, ...]) -> str:
    """The chain as one ASCII header value: ``style:whisper,emotion:sad,speed:more%20slower``
    (each label percent-encoded as UTF-8, so any option name stays header-safe)."""
    return ",".join(quote(step.label, safe=":_-") for step in steps)
