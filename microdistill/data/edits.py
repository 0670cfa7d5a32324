"""Edits that keep what a short text means: the teacher's consistency test (evaluate/consistency.py)
and the heads student's training augmentation (train/heads.py) share them.

    from microdistill.data.edits import EDITS, augment
    EDITS["punctuation"]("Nice!")        # "Nice"
    augment("thanks a lot", rng)         # one of the AUGMENTATIONS, chosen by rng

Each is a pure function of the text (`augment` draws which edit and its details from `rng`).
"""

from __future__ import annotations

import random
import re
from typing import Callable

MARKS = (".", "!", "?")
_SINGLE_SPACE = re.compile(r"(?<! ) (?! )")


def punctuation(text: str) -> str:
    """Toggle the trailing punctuation: drop a final ".", "!" or "?" along with any spaces
    around it at the end ("Nice! " -> "Nice", "Nice ." -> "Nice"), else end the text with
    "." ("Nice " -> "Nice."). A text of only whitespace is left as it is."""
    stripped = text.rstrip()
    if not stripped:
        return text
    if stripped.endswith(MARKS):
        return stripped[:-1].rstrip()
    return stripped + "."


def first_case(text: str) -> str:
    """Swap the case of the first character when it is a letter ("nice" -> "Nice",
    "Nice" -> "nice"); a text starting otherwise (space, digit, quote) is left as it is."""
    if not text or not text[0].isalpha():
        return text
    return text[0].swapcase() + text[1:]


def double_space(text: str) -> str:
    """Double the first single space, one with no space either side ("a b c" -> "a  b c",
    "a  b c" -> "a  b  c"); a text without one is left as it is."""
    return _SINGLE_SPACE.sub("  ", text, count=1)


EDITS: dict[str, Callable[[str], str]] = {
    "punctuation": punctuation,
    "first_case": first_case,
    "double_space": double_space,
}



# Emoji that carry no sentiment of their own, and a link of no site in particular.
NEUTRAL_EMOJI = ("👀", "📌", "🧵", "📝", "🗓️")
LINK = "https://example.com/p/{n}"


def lowercase(text: str) -> str:
    return text.lower()


def trailing_emoji(text: str, rng: random.Random) -> str:
    return f"{text.rstrip()} {rng.choice(NEUTRAL_EMOJI)}"


def trailing_link(text: str, rng: random.Random) -> str:
    return f"{text.rstrip()} {LINK.format(n=rng.randrange(10_000))}"


# What a served student meets that its training inputs may lack: the text's meaning is the same.
AUGMENTATIONS: dict[str, Callable[[str, random.Random], str]] = {
    "punctuation": lambda t, rng: punctuation(t),
    "first_case": lambda t, rng: first_case(t),
    "lowercase": lambda t, rng: lowercase(t),
    "emoji": trailing_emoji,
    "link": trailing_link,
}


def augment(text: str, rng: random.Random) -> str:
    """`text` with one augmentation chosen by `rng` (one that changes it, when any does)."""
    names = list(AUGMENTATIONS)
    rng.shuffle(names)
    for name in names:
        edited = AUGMENTATIONS[name](text, rng)
        if edited != text:
            return edited
    return text
