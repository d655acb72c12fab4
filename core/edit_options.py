"""The edit types and their options, as the Step-Audio-EditX model was trained on them.

Owns: the option lists (upstream order), the Chinese names we accept for them, the paralinguistic
and language tags, and spotting tags in text that the model does not know. Both engines, the UI,
the API and the command line read them from here; the preview engine marks which ones it can honour.
Does not own: turning free-form instructions into edits (``core.instructions``).
"""

from __future__ import annotations

import re

EMOTIONS = ("happy", "angry", "sad", "humour", "confusion", "disgusted", "empathy", "embarrass", "fear",
            "surprised", "excited", "depressed", "coldness", "admiration", "remove")
STYLES = ("serious", "arrogant", "child", "older", "girl", "pure", "sister", "sweet", "ethereal", "whisper",
          "gentle", "recite", "generous", "act_coy", "warm", "shy", "comfort", "authority", "chat", "radio",
          "soulful", "story", "vivid", "program", "news", "advertising", "roar", "murmur", "shout", "deeply",
          "loudly", "remove", "exaggerated")
SPEEDS = ("faster", "slower", "more faster", "more slower")

# edit_type -> the edit_info values it accepts (empty: it takes none).
EDIT_TYPES: dict[str, tuple[str, ...]] = {
    "emotion": EMOTIONS,
    "style": STYLES,
    "speed": SPEEDS,
    "paralinguistic": (),
    "denoise": (),
    "vad": (),
}

# The ten tags of the 2025 release (upstream README and app.py help text, in that order).
PARALINGUISTIC_TAGS_2025 = ("[Breathing]", "[Laughter]", "[Surprise-oh]", "[Confirmation-en]", "[Uhm]",
                            "[Surprise-ah]", "[Surprise-wa]", "[Sigh]", "[Question-ei]", "[Dissatisfaction-hnn]")
# Added by the 2026-01 model release. Spelling and case as the release notes give them: the sound
# words are lower case (one has a space), the interjections follow the 2025 "Kind-sound" pattern.
PARALINGUISTIC_TAGS_2026 = ("[exhale]", "[snort]", "[inhale]", "[chuckle]", "[clears throat]", "[giggle]",
                            "[cough]", "[breath]", "[Surprise-yo]", "[Question-ah]", "[Question-en]",
                            "[Question-yi]", "[Question-oh]")
PARALINGUISTIC_TAGS = PARALINGUISTIC_TAGS_2025 + PARALINGUISTIC_TAGS_2026
LANGUAGE_TAGS = ("[Sichuanese]", "[Cantonese]", "[Japanese]", "[Korean]")
KNOWN_TAGS = PARALINGUISTIC_TAGS + LANGUAGE_TAGS

# Anything in square brackets on one line, up to 40 characters: what a user may mean as a tag.
TAG_PATTERN = re.compile(r"\[[^\[\]\n]{1,40}\]")
_BY_FOLDED = {t.casefold(): t for t in KNOWN_TAGS}

# Chinese names accepted for each option (ours, not upstream's: upstream names options in English
# only). (edit_type, option) -> names; each name maps to exactly one option (a test checks it).
CHINESE_NAMES: dict[tuple[str, str], tuple[str, ...]] = {
    ("emotion", "happy"): ("开心", "高兴", "快乐"),
    ("emotion", "angry"): ("生气", "愤怒"),
    ("emotion", "sad"): ("悲伤", "难过", "伤心"),
    ("emotion", "humour"): ("幽默",),
    ("emotion", "confusion"): ("困惑", "疑惑"),
    ("emotion", "disgusted"): ("厌恶", "恶心"),
    ("emotion", "empathy"): ("共情", "同情"),
    ("emotion", "embarrass"): ("尴尬",),
    ("emotion", "fear"): ("害怕", "恐惧"),
    ("emotion", "surprised"): ("惊讶", "吃惊"),
    ("emotion", "excited"): ("兴奋", "激动"),
    ("emotion", "depressed"): ("沮丧", "低落"),
    ("emotion", "coldness"): ("冷漠", "冷淡"),
    ("emotion", "admiration"): ("钦佩", "崇拜", "赞赏"),
    ("emotion", "remove"): ("去除情绪", "无情绪", "中性"),
    ("style", "serious"): ("严肃",),
    ("style", "arrogant"): ("傲慢", "高傲"),
    ("style", "child"): ("孩童", "童声", "小孩"),
    ("style", "older"): ("老年", "老人"),
    ("style", "girl"): ("少女",),
    ("style", "pure"): ("纯真", "清纯"),
    ("style", "sister"): ("御姐",),
    ("style", "sweet"): ("甜美",),
    ("style", "ethereal"): ("空灵",),
    ("style", "whisper"): ("耳语", "悄悄话", "低语"),
    ("style", "gentle"): ("温柔",),
    ("style", "recite"): ("朗诵",),
    ("style", "generous"): ("豪爽", "大方"),
    ("style", "act_coy"): ("撒娇",),
    ("style", "warm"): ("温暖",),
    ("style", "shy"): ("害羞",),
    ("style", "comfort"): ("安慰",),
    ("style", "authority"): ("权威",),
    ("style", "chat"): ("聊天", "闲聊"),
    ("style", "radio"): ("电台",),
    ("style", "soulful"): ("深情",),
    ("style", "story"): ("讲故事", "故事"),
    ("style", "vivid"): ("生动",),
    ("style", "program"): ("节目主持", "主持"),
    ("style", "news"): ("新闻播报", "新闻"),
    ("style", "advertising"): ("广告",),
    ("style", "roar"): ("咆哮",),
    ("style", "murmur"): ("嘟囔", "喃喃"),
    ("style", "shout"): ("喊叫", "大喊"),
    ("style", "deeply"): ("低沉",),
    ("style", "loudly"): ("大声", "响亮"),
    ("style", "remove"): ("去除风格", "无风格"),
    ("style", "exaggerated"): ("夸张",),
    ("speed", "faster"): ("快一点", "更快", "加快", "快"),
    ("speed", "slower"): ("慢一点", "更慢", "放慢", "慢"),
    ("speed", "more faster"): ("快很多", "非常快"),
    ("speed", "more slower"): ("慢很多", "非常慢"),
    ("denoise", ""): ("降噪", "去噪", "去除噪音"),
    ("vad", ""): ("去除静音", "去静音", "删除静音"),
}


def unknown_tags(text: str | None) -> tuple[str, ...]:
    """Bracketed words in ``text`` that are not tags the model knows, in order, without repeats."""
    if not text:
        return ()
    return tuple(dict.fromkeys(t for t in TAG_PATTERN.findall(text) if t not in KNOWN_TAGS))


def tag_warning(text: str | None) -> str:
    """A warning naming the unknown tags of ``text`` (and the known ones), or "" when all are known.

    The text still goes to the model as it is: an unknown tag is read as words, not refused.
    """
    unknown = unknown_tags(text)
    if not unknown:
        return ""
    hints = [f"{t} (did you mean {_BY_FOLDED[t.casefold()]}?)" if t.casefold() in _BY_FOLDED else t for t in unknown]
    return (f"unknown tag{'s' if len(unknown) > 1 else ''} {', '.join(hints)}: the model will read "
            f"{'them' if len(unknown) > 1 else 'it'} as text. Known paralinguistic tags: "
            f"{' '.join(PARALINGUISTIC_TAGS)}; language tags (at the start): {' '.join(LANGUAGE_TAGS)}")
