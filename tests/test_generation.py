"""generation.py on the tiny random teacher: batching with the shared prefix cache changes
nothing, answers are valid, grammar drafts are only a speed-up, and decision points are
distributions over each enum field's values that agree with the teacher's choice."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from microdistill.core.grammar import Grammar
from microdistill.teachers.decoding import Decoder, GenerationError, value_starts
from microdistill.core.task import load_task
from microdistill.teachers import load_teacher

# very different lengths, so the batch holds padding; a leading space, non-ASCII and a newline
TEXTS = ["you idiot", "thanks so much, this fixed my problem!", "what a lovely day at the beach with friends today",
         "this is the worst service I have ever had", " shut up", "naïve café 😀", "a\nb c"]


@pytest.fixture(scope="module")
def teacher(tiny_teacher_dir):
    return load_teacher(str(tiny_teacher_dir))


def make_decoder(teacher, task_name: str = "reddit-comment", **kw) -> Decoder:
    task = load_task(task_name)
    grammar = Grammar(task, teacher.tokenizer, teacher.vocab_size, teacher.eos_id, allowed=None)
    return Decoder(teacher, task, grammar, **kw)


@pytest.fixture(scope="module")
def decoder(teacher):
    return make_decoder(teacher, keep_ids=range(teacher.vocab_size))


@pytest.fixture(scope="module")
def batch(decoder):
    return decoder.generate([decoder.rest_ids(t) for t in TEXTS], decoder.task.output.max_tokens)


def answer_texts(teacher, batch) -> list[str | None]:
    return [teacher.tokenizer.decode(r.output_ids[:-1]) if r.finished else None for r in batch.rows]


def test_prefix_is_shared_and_rests_are_ragged(decoder, batch, teacher):
    assert len(decoder.layout.prefix_ids) > 100  # system prompt and few-shot turns are cached once
    assert batch.n_prefix == len(decoder.layout.prefix_ids)
    assert len({len(r) for r in batch.rests}) >= 4
    for text, rest in zip(TEXTS, batch.rests):
        whole = teacher.tokenizer(teacher.prompt_text(decoder.task, text), add_special_tokens=False).input_ids
        assert decoder.layout.prefix_ids + rest == whole


def test_batched_equals_one_at_a_time(decoder, batch):
    """Each row of the padded, prefix-cached batch decodes exactly what the input decodes alone."""
    max_tokens = decoder.task.output.max_tokens
    for text, row in zip(TEXTS, batch.rows):
        alone = decoder.generate([decoder.rest_ids(text)], max_tokens).rows[0]
        assert alone.output_ids == row.output_ids, text
        assert alone.finished == row.finished
        np.testing.assert_allclose(row.lse, alone.lse, atol=1e-4, rtol=0)
        np.testing.assert_allclose(np.stack(row.logits).astype(np.float32), np.stack(alone.logits).astype(np.float32),
                                   atol=2e-2, rtol=0)  # float16 rows
        assert len(row.logits) == len(row.lse) == len(row.output_ids)


def test_batched_logits_equal_a_plain_forward(decoder, batch, teacher):
    """Every row, padded or not, against an uncached, unpadded forward pass over prompt + answer."""
    for text, row in zip(TEXTS, batch.rows):
        prompt = teacher.tokenizer(teacher.prompt_text(decoder.task, text), add_special_tokens=False).input_ids
        with torch.inference_mode():
            ids = torch.tensor([prompt + row.output_ids[:-1]])
            ref = teacher.model(input_ids=ids).logits[0, len(prompt) - 1 :].float()
        np.testing.assert_allclose(row.lse, torch.logsumexp(ref, -1).numpy(), atol=1e-4, err_msg=text)
        np.testing.assert_allclose(np.stack(row.logits).astype(np.float32), ref.numpy(), atol=2e-2, err_msg=text)


@pytest.mark.parametrize("task_name", ["reddit-comment", "support-ticket"])
def test_every_finished_answer_is_a_valid_canonical_output(teacher, task_name):
    dec = make_decoder(teacher, task_name)
    out = dec.generate([dec.rest_ids(t) for t in TEXTS], dec.task.output.max_tokens)
    assert all(r.finished for r in out.rows)  # this teacher answers in ~20-30 tokens
    for row, text in zip(out.rows, answer_texts(teacher, out)):
        assert row.output_ids[-1] == teacher.eos_id and teacher.eos_id not in row.output_ids[:-1]
        fields = dec.task.parse(text)
        assert list(fields) == dec.task.field_names
        assert dec.task.serialize(fields) == text  # compact separators, schema order


def test_drafts_change_nothing_but_the_number_of_passes(teacher, batch):
    no_drafts = make_decoder(teacher, keep_ids=range(teacher.vocab_size), use_drafts=False)
    calls = {"n": 0}
    hook = no_drafts.model.register_forward_hook(lambda *a: calls.__setitem__("n", calls["n"] + 1))
    try:
        slow = no_drafts.generate([no_drafts.rest_ids(t) for t in TEXTS], no_drafts.task.output.max_tokens)
    finally:
        hook.remove()
    assert [r.output_ids for r in slow.rows] == [r.output_ids for r in batch.rows]
    assert [r.finished for r in slow.rows] == [r.finished for r in batch.rows]
    for a, b in zip(slow.rows, batch.rows):
        np.testing.assert_allclose(a.lse, b.lse, atol=1e-4, rtol=0)
    # without drafts: one pass for the prompts, then one per answer token of the longest answer
    assert calls["n"] == max(len(r.output_ids) for r in batch.rows)


def test_drafts_take_fewer_passes(teacher, decoder):
    calls = {"n": 0}
    hook = decoder.model.register_forward_hook(lambda *a: calls.__setitem__("n", calls["n"] + 1))
    try:
        out = decoder.generate([decoder.rest_ids(TEXTS[0])], decoder.task.output.max_tokens)
    finally:
        hook.remove()
    assert calls["n"] < len(out.rows[0].output_ids) / 2  # keys and punctuation are forced


def test_cut_at_max_tokens(decoder, batch):
    short = decoder.generate([decoder.rest_ids(t) for t in TEXTS], 5)
    for full, cut in zip(batch.rows, short.rows):
        assert not cut.finished and cut.output_ids == full.output_ids[:5]
    assert decoder.decisions(short, [None] * len(TEXTS)) == [{}] * len(TEXTS)


def test_mass_accumulates_one_distribution_per_step(teacher, decoder):
    mass = torch.zeros(teacher.vocab_size, dtype=torch.float64)
    out = decoder.generate([decoder.rest_ids(t) for t in TEXTS[:3]], decoder.task.output.max_tokens, mass=mass)
    steps = sum(len(r.output_ids) for r in out.rows)
    assert float(mass.sum()) == pytest.approx(steps, rel=1e-5)
    assert float(mass.min()) >= 0


def test_decisions_are_distributions_matching_the_choice(teacher, decoder, batch):
    texts = answer_texts(teacher, batch)
    texts[1] = None  # a row cut at max_tokens is skipped
    decisions = decoder.decisions(batch, texts)
    assert decisions[1] == {}
    task = decoder.task
    for text, d in zip(texts, decisions):
        if text is None:
            continue
        fields = task.parse(text)
        assert set(d) == {f.name for f in task.enum_fields}
        for f in task.enum_fields:
            p = d[f.name]
            assert p.dtype == np.float32 and p.shape == (len(f.values),)
            assert np.all(p >= 0) and p.sum() == pytest.approx(1.0, abs=1e-5)
            assert f.values[int(np.argmax(p))] == fields[f.name], (text, f.name, p)


def test_decisions_equal_teacher_forcing(teacher, decoder, batch):
    """P(value) of one row, recomputed by plain forward passes over prompt + answer prefix + value."""
    tok, task = teacher.tokenizer, decoder.task
    text = answer_texts(teacher, batch)[0]
    row = batch.rows[0]
    got = decoder.decisions(batch, [text] + [None] * (len(TEXTS) - 1))[0]
    prompt = tok(teacher.prompt_text(task, TEXTS[0]), add_special_tokens=False).input_ids
    for f, start in zip(task.enum_fields, value_starts(task, text)):
        j = next(t for t in range(len(row.output_ids)) if tok.decode(row.output_ids[:t]) == text[:start])
        context = prompt + row.output_ids[:j]
        scores = []
        for value in f.values:
            cont = tok(value, add_special_tokens=False).input_ids
            with torch.inference_mode():
                logp = teacher.model(input_ids=torch.tensor([context + cont])).logits[0].float().log_softmax(-1)
            scores.append(sum(float(logp[len(context) - 1 + k, c]) for k, c in enumerate(cont)))
        np.testing.assert_allclose(got[f.name], torch.tensor(scores).softmax(0).numpy(), atol=1e-4)


def test_value_starts():
    task = load_task("support-ticket")
    text = '{"team":"billing","urgency":"high","summary":"x"}'
    starts = value_starts(task, text)
    assert [text[s:s + 4] for s in starts] == ["bill", "high"]
    with pytest.raises(GenerationError, match="'urgency' not found"):
        value_starts(task, '{"team":"billing"}')


class _Drafter:
    """Proposes each row's known answer (right=True) or tokens one id off it, after the forced ones."""

    def __init__(self, answers: dict[str, list[int]], right: bool, tokens: int = 4):
        self.answers, self.right, self.tokens, self.accepted, self.proposed = answers, right, tokens, 0, 0

    def start(self, texts):
        self.rows = [self.answers[t] for t in texts]

    def propose(self, answers, forced, budgets):
        out = {}
        for b, so_far in answers.items():
            at = len(so_far) + len(forced[b])
            if self.rows[b][len(so_far):at] != forced[b]:  # the teacher spells a forced string otherwise
                continue
            out[b] = [t if self.right else t + 1 for t in self.rows[b][at:at + min(self.tokens, budgets[b])]]
            self.proposed += len(out[b])
        return out


@pytest.mark.parametrize("right", [True, False])
def test_a_drafter_changes_the_passes_never_the_answers(teacher, batch, right):
    """A drafter's tokens are checked as the grammar's are: a right one saves passes, a wrong one none,
    and either way every row is what decoding without it gives."""
    drafter = _Drafter({t: r.output_ids for t, r in zip(TEXTS, batch.rows)}, right)
    drafted = make_decoder(teacher, keep_ids=range(teacher.vocab_size), drafter=drafter)
    plain = make_decoder(teacher, keep_ids=range(teacher.vocab_size))
    out = drafted.generate([drafted.rest_ids(t) for t in TEXTS], drafted.task.output.max_tokens, texts=TEXTS)
    plain.generate([plain.rest_ids(t) for t in TEXTS], plain.task.output.max_tokens)
    assert [r.output_ids for r in out.rows] == [r.output_ids for r in batch.rows]
    for a, b in zip(out.rows, batch.rows):
        np.testing.assert_allclose(a.lse, b.lse, atol=1e-4, rtol=0)
        np.testing.assert_allclose(np.stack(a.logits).astype(np.float32), np.stack(b.logits).astype(np.float32),
                                   atol=2e-2, rtol=0)
    assert drafter.proposed > 0
    if right:
        assert drafter.accepted == drafter.proposed and drafted.passes < plain.passes
    else:
        assert drafter.accepted == 0 and drafted.passes == plain.passes


def test_teacher_forced_scores_are_the_logits_decoding_kept(teacher, decoder, batch):
    """Scoring an answer in one pass gives the logits its decoding stored (the student's answers are
    scored this way in on-policy training)."""
    from microdistill.teachers.scoring import teacher_forced

    rows = teacher_forced(decoder, batch.rests, [r.output_ids for r in batch.rows], range(teacher.vocab_size))
    for (logits, lse), row in zip(rows, batch.rows):
        assert logits.shape == (len(row.output_ids), teacher.vocab_size)
        np.testing.assert_allclose(lse, row.lse, atol=1e-4, rtol=0)
        np.testing.assert_allclose(logits, np.stack(row.logits).astype(np.float32), atol=2e-2, rtol=0)
