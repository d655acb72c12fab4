"""The edit types and their options, as the Step-Audio-EditX model was trained on them.

Owns: the option lists (upstream order) and the paralinguistic and language tags. Both engines
and the UI read them from here; the preview engine marks which ones it can honour.
"""

from __future__ import annotations

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

PARALINGUISTIC_TAGS = ("[Breathing]", "[Laughter]", "[Surprise-oh]", "[Confirmation-en]", "[Uhm]",
                       "[Surprise-ah]", "[Surprise-wa]", "[Sigh]", "[Question-ei]", "[Dissatisfaction-hnn]")
LANGUAGE_TAGS = ("[Sichuanese]", "[Cantonese]", "[Japanese]", "[Korean]")
