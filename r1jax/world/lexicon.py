"""The tiny world's bilingual lexicon and its script-based language measure.

Every word the tiny world writes in reasoning, facts and dialogues comes from this one table, so the
set of CJK characters stays small enough for a ~512-piece SentencePiece vocabulary, and the
language-consistency reward of R1's reasoning-oriented RL (docs/reference.md §4.3: "the share of
target-language words in the CoT") has an exact, cheap definition:

- a *word* is a maximal run of Latin letters (one English word) or a single CJK ideograph;
- digits, operators, punctuation and markup (`<think>`, `</answer>`, `<|summary|>`) are neutral: they
  count for neither language, so a caller may pass a whole completion;
- `language_share(text, lang)` = target-language words / all words, and 0.0 when there are none
  (an empty or digits-only chain of thought earns no consistency reward).

The zh side writes words separated by spaces, like the en side: the tiny world is a toy, and one
tokenization for numbers and operators in both languages lets a tiny model share its arithmetic
between them.
"""

import re

LANGUAGES = ("en", "zh")

# key -> (en, zh). Keys are the en form unless the en form is ambiguous.
LEXICON = {
    # reasoning
    "plus": ("plus", "加"),
    "minus": ("minus", "减"),
    "times": ("times", "乘"),
    "equals": ("equals", "等于"),
    "first": ("first", "首先"),
    "then": ("then", "然后"),
    "next": ("next", "接着"),
    "so": ("so", "所以"),
    "answer": ("answer", "答案"),
    "the answer is": ("the answer is", "答案 是"),
    "wait": ("wait", "等等"),
    "check": ("check", "检查"),
    "let me check": ("let me check", "让 我 检查"),
    "not": ("not", "不是"),
    "try": ("try", "试试"),
    "target": ("target", "目标"),
    "is not a target": ("is not a target", "不是 目标"),
    "yes": ("yes", "对"),
    "no": ("no", "不对"),
    # world objects and attributes
    "apple": ("apple", "苹果"),
    "banana": ("banana", "香蕉"),
    "sky": ("sky", "天空"),
    "grass": ("grass", "草"),
    "snow": ("snow", "雪"),
    "sun": ("sun", "太阳"),
    "milk": ("milk", "牛奶"),
    "cat": ("cat", "猫"),
    "dog": ("dog", "狗"),
    "bird": ("bird", "鸟"),
    "fish": ("fish", "鱼"),
    "horse": ("horse", "马"),
    "red": ("red", "红"),
    "yellow": ("yellow", "黄"),
    "blue": ("blue", "蓝"),
    "green": ("green", "绿"),
    "white": ("white", "白"),
    "black": ("black", "黑"),
    "run": ("run", "跑"),
    "fly": ("fly", "飞"),
    "swim": ("swim", "游泳"),
    "book": ("book", "书"),
    "water": ("water", "水"),
    "hello": ("hello", "你好"),
    "thanks": ("thanks", "谢谢"),
}

_BY_LANGUAGE = {lang: {k: v[i] for k, v in LEXICON.items()} for i, lang in enumerate(LANGUAGES)}
_MARKUP = re.compile(r"</?[A-Za-z_]+>|<\|[A-Za-z_]+\|>")
_LATIN_WORD = re.compile(r"[A-Za-z]+")
_CJK_CHAR = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")


def word(key: str, language: str) -> str:
    """The lexicon entry `key` written in `language` ("en" or "zh")."""
    return _BY_LANGUAGE[language][key]


def other_language(language: str) -> str:
    """The tiny world's other language: en <-> zh."""
    return LANGUAGES[1 - LANGUAGES.index(language)]


def script_counts(text: str) -> dict:
    """Counts of words by script: {"en": Latin-letter runs, "zh": CJK ideographs}; markup ignored."""
    text = _MARKUP.sub(" ", text)
    return {"en": len(_LATIN_WORD.findall(text)), "zh": len(_CJK_CHAR.findall(text))}


def language_share(text: str, language: str) -> float:
    """Share of `language` words among all words of `text` (0.0 when it has no words)."""
    counts = script_counts(text)
    total = counts["en"] + counts["zh"]
    return counts[language] / total if total else 0.0


def is_mixed(text: str, threshold: float = 0.95) -> bool:
    """True when neither language holds `threshold` of the words: a mixed-language text."""
    counts = script_counts(text)
    total = counts["en"] + counts["zh"]
    return total > 0 and max(counts.values()) / total < threshold


def cjk_characters(text: str) -> set:
    """The distinct CJK ideographs of `text` (the tokenizer must cover every one)."""
    return set(_CJK_CHAR.findall(text))
