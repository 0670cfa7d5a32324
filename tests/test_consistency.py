"""consistency.py: each meaning-keeping edit on hand examples, the shares on a fake teacher
checked by hand, and one run end to end with the tiny random teacher."""

from __future__ import annotations

import pytest

from microdistill.evaluate.agreement import wilson_interval
from microdistill.data.edits import EDITS, double_space, first_case, punctuation
from microdistill.evaluate.consistency import self_consistency


# ---- the edits ------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, expected", [
    ("Nice.", "Nice"), ("Nice!", "Nice"), ("Nice?", "Nice"),
    ("Nice! ", "Nice"), ("Nice .", "Nice"), ("Wait?!", "Wait?"),  # trailing spaces go with the mark
    ("Nice", "Nice."), ("Nice ", "Nice."), ("line\n", "line."), ("Nice,", "Nice,."),
    ("", ""), ("   ", "   "),  # nothing to punctuate: skipped
])
def test_punctuation(text, expected):
    assert punctuation(text) == expected


def test_punctuation_toggles_back():
    for text in ["Nice", "Nice.", "you idiot", "Really ok."]:
        assert punctuation(punctuation(text)) == text


@pytest.mark.parametrize("text, expected", [
    ("nice day", "Nice day"), ("Nice day", "nice day"), ("élan", "Élan"), ("I", "i"),
    (" nice", " nice"), ("1st", "1st"), ('"quoted"', '"quoted"'), ("", ""),  # no leading letter: skipped
    ("中文", "中文"),  # a letter without case: unchanged, so skipped
])
def test_first_case(text, expected):
    assert first_case(text) == expected


@pytest.mark.parametrize("text, expected", [
    ("a b c", "a  b c"), ("a  b c", "a  b  c"), (" a", "  a"), ("a ", "a  "),
    ("ab", "ab"), ("", ""), ("a\tb", "a\tb"), ("a   b", "a   b"),  # no single space: skipped
])
def test_double_space(text, expected):
    assert double_space(text) == expected


def test_edits_are_the_three_documented_ones():
    assert list(EDITS) == ["punctuation", "first_case", "double_space"]
    assert all(EDITS[name].__doc__ for name in EDITS)


# ---- the measure on a fake teacher -----------------------------------------------------------------
TEXTS = ["Hello!", "hello there", "Yes", "   ", "ok!"]


class Fake:
    """A teacher whose answer turns on a final "!" and on a double space; records its calls."""

    def __init__(self):
        self.calls: list[list[str]] = []

    def __call__(self, texts: list[str]) -> list[str]:
        self.calls.append(list(texts))
        return [f"{'loud' if t.endswith('!') else 'calm'}|{'  ' in t}" for t in texts]


def test_shares_match_a_hand_count():
    fake = Fake()
    r = self_consistency(fake, TEXTS, batch_size=2)
    # punctuation applies to all but "   ": "Hello!" and "ok!" lose their "!" and flip
    # first_case applies to the same four, and the fake ignores case
    # double_space applies to "hello there" only, and the fake sees the double space
    assert r["n"] == 5
    assert r["edits"] == {
        "punctuation": {"n": 4, "changed": 0.5},
        "first_case": {"n": 4, "changed": 0.0},
        "double_space": {"n": 1, "changed": 1.0},
    }
    # consistent: "Yes", and "   " which no edit applies to
    assert r["consistent"] == 2 / 5
    assert r["consistent_ci95"] == pytest.approx(wilson_interval(2, 5))
    # originals, then one pass per edit over the texts it changes, in chunks of 2
    assert [len(c) for c in fake.calls] == [2, 2, 1, 2, 2, 2, 2, 1]
    assert fake.calls[3] == ["Hello", "hello there."]
    assert fake.calls[-1] == ["hello  there"]


def test_given_originals_agree_with_computed_ones():
    fake = Fake()
    computed = self_consistency(fake, TEXTS, batch_size=16)
    assert len(fake.calls) == 1 + len(EDITS)
    fake.calls.clear()
    given = self_consistency(fake, TEXTS, originals=fake(TEXTS), batch_size=16)
    assert given == computed
    assert len(fake.calls) == 1 + len(EDITS)  # the call above, then one per edit: originals not recomputed


def test_a_text_flipped_by_two_edits_counts_once():
    def answer(texts):
        return ["x" if t == "Go on" else "y" for t in texts]  # any edit of "Go on" flips it

    r = self_consistency(answer, ["Go on", "Stay"])
    assert r["edits"]["punctuation"] == {"n": 2, "changed": 0.5}
    assert r["edits"]["first_case"] == {"n": 2, "changed": 0.5}
    assert r["edits"]["double_space"] == {"n": 1, "changed": 1.0}
    assert r["consistent"] == 0.5


def test_edge_cases_and_errors():
    fake = Fake()
    r = self_consistency(fake, [])
    assert r["n"] == 0 and r["consistent"] is None and fake.calls == []
    assert all(e == {"n": 0, "changed": None} for e in r["edits"].values())
    with pytest.raises(ValueError, match="original answers"):
        self_consistency(fake, TEXTS, originals=["a"])
    with pytest.raises(ValueError, match="answers for"):
        self_consistency(lambda texts: ["a"], TEXTS)
    with pytest.raises(ValueError, match="batch_size"):
        self_consistency(fake, TEXTS, batch_size=0)


# ---- the real tiny teacher --------------------------------------------------------------------------
REAL = ["you idiot", "Thanks so much, this fixed my problem!", "what a lovely day at the beach",
        "This is the worst service I have ever had.", "123 nope", "ok", "shut up, you troll?", "fine  then"]


def test_runs_end_to_end_with_the_tiny_teacher(tiny_teacher_dir):
    from microdistill.core.task import load_task
    from microdistill.teachers import load_teacher
    from microdistill.teachers.labeller import TeacherAnswers

    task = load_task("reddit-comment")
    run = TeacherAnswers(load_teacher(str(tiny_teacher_dir)), task).texts
    originals = run(REAL)
    assert all(isinstance(a, str) and a for a in originals)

    r = self_consistency(run, REAL, originals=originals, batch_size=8)
    assert r["n"] == len(REAL)
    assert 0.0 <= r["consistent"] <= 1.0
    lo, hi = r["consistent_ci95"]
    assert 0.0 <= lo <= r["consistent"] <= hi <= 1.0
    for name, edit in EDITS.items():
        assert r["edits"][name]["n"] == sum(edit(t) != t for t in REAL)
        assert 0.0 <= r["edits"][name]["changed"] <= 1.0
    assert [r["edits"][n]["n"] for n in EDITS] == [8, 7, 6]  # the skip cases are really in REAL


def test_augment_changes_the_text_by_one_augmentation():
    import random

    from microdistill.data.edits import AUGMENTATIONS, NEUTRAL_EMOJI, augment

    text = "Thanks a LOT"
    which = {"thanks a lot": "lowercase", "thanks a LOT": "first_case", "Thanks a LOT.": "punctuation"}
    rng, seen = random.Random(0), set()
    for _ in range(100):
        edited = augment(text, rng)
        tail = edited.removeprefix(text + " ")
        seen.add(which.get(edited) or ("emoji" if tail in NEUTRAL_EMOJI else "link" if tail.startswith("https://") else edited))
    assert seen == set(AUGMENTATIONS)
    assert augment("thanks", random.Random(1)) != "thanks"  # lowercase changes nothing here; another edit does
