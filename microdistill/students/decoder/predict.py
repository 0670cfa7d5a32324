"""A decoder student's generation: batched, KV-cached, greedy, and schema-constrained by default;
and its held-out metrics, which the trainer logs every epoch and the evaluation reports.

    microdistill predict --student runs/demo/student "thanks, that fixed it!"

New text goes through the same cleaning as the corpus (the task's strip patterns, collapsed
whitespace) and the input vocabulary's byte fallback, so any text encodes. Text longer than
the student's input context is truncated to its first `max_input` tokens (and the result says
`"truncated": true`): the student was trained on inputs of at most that length, the same
filter the corpus applied, and a label for the start of a long text beats no label at all.

Constrained decoding asks the task grammar (xgrammar, in the teacher's token space) which
teacher ids may come next, reads those bits at the kept ids only, and masks the student's
logits there. Reading K bits instead of scattering K logits into a full-vocabulary row is the
same mask at a fraction of the cost (the teacher vocabulary can be 262k wide).
"""

from __future__ import annotations

import json
from typing import Any, Sequence

import torch

from microdistill.data.corpus import by_length, clean_inputs
from microdistill.students.decoder.config import PAD
from microdistill.core.task import EnumField, StringField, Task, parse_or_none
from microdistill.students.decoder.data import Example, collate

def predict(student, texts: Sequence[str], constrain: bool = True, batch_size: int = 64,
            drafts: bool = True) -> list[dict[str, Any]]:
    """One result per text of a LoadedDecoder (folder.py): {"text", "output" (str), "fields" (dict,
    or None when the output is not a valid object), "valid" (bool), "truncated" (bool: the input
    exceeded the context)}."""
    ids = [student.encoder.encode(t) for t in clean_inputs(student.task, texts)]
    limit = student.config.max_input
    outputs = generate(student, [x[:limit] for x in ids], constrain=constrain, batch_size=batch_size, drafts=drafts)
    results = []
    for text, x, out in zip(texts, ids, outputs):
        output = student.tokenizer.decode(out, skip_special_tokens=False)
        fields = parse_or_none(student.task, output)
        results.append({"text": text, "output": output, "fields": fields, "valid": fields is not None,
                        "truncated": len(x) > limit})
    return results


def generate(student, input_ids: Sequence[Sequence[int]], constrain: bool = True,
             batch_size: int = 64, drafts: bool = True) -> list[list[int]]:
    """Greedy outputs (teacher ids, without EOS) for inputs given as teacher ids of the input vocabulary.

    Inputs are batched by length so little compute goes to padding; results keep the input order.
    drafts: under the grammar, check the tokens it forces next in the same model call (the same
    outputs in fewer calls; False decodes one token per call).
    """
    index = student.input_index
    rows: list[list[int]] = []
    for n, ids in enumerate(input_ids):
        try:
            rows.append([index[int(i)] for i in ids])
        except KeyError as e:
            raise ValueError(f"input {n}: teacher token {e.args[0]} is not in the student's input vocabulary") from None
    out: list[list[int]] = [[] for _ in rows]
    was_training = student.model.training
    student.model.eval()
    try:
        for chunk in by_length([len(r) for r in rows], batch_size):
            for i, ids in zip(chunk, _generate_batch(student, [rows[i] for i in chunk], constrain, drafts)):
                out[i] = ids
    finally:
        student.model.train(was_training)
    return out


def _pad(rows: list[list[int]]) -> torch.Tensor:
    """Right-padded [B, max_len] LongTensor of student input indices."""
    width = max((len(r) for r in rows), default=0)
    return torch.tensor([r + [PAD] * (width - len(r)) for r in rows], dtype=torch.long).view(len(rows), width)


@torch.no_grad()
def _generate_batch(student, rows: list[list[int]], constrain: bool,
                    drafts: bool = False) -> list[list[int]]:
    """Greedy decoding of one batch; returns teacher ids per row, EOS excluded.

    A row stops at EOS, or after max_output tokens (unconstrained) or `step_budget` tokens
    (constrained); under the grammar a row whose allowed set is empty (impossible with a
    well-built kept vocabulary) stops where it is, and is invalid.
    """
    if constrain and drafts:
        return _generate_batch_drafted(student, rows)
    kept = torch.as_tensor(student.kept, dtype=torch.long)
    K, eos = len(kept), student.eos_id
    B = len(rows)
    batch = student.grammar.batch(B) if constrain else None
    done = [False] * B
    out: list[list[int]] = [[] for _ in range(B)]
    logits, cache = student.model.prefill(_pad(rows))
    for _ in range(step_budget(student.task, student.config.max_output) if constrain else student.config.max_output):
        # The optional last output index is the "outside the kept vocabulary" tail class: never said.
        scores = logits[:, :K].float()
        active = [i for i in range(B) if not done[i]]
        if batch is not None:
            allowed = torch.zeros(B, K, dtype=torch.bool)
            allowed[active] = _allowed(batch, active, kept)
            scores = scores.masked_fill(~allowed, float("-inf"))
        tok = scores.argmax(-1)
        for i in active:
            t = int(kept[tok[i]])
            if batch is not None:
                if not bool(allowed[i].any()):
                    done[i] = True
                    continue
                batch.accept(i, t)
            if t == eos:
                done[i] = True
            else:
                out[i].append(t)
                done[i] = batch is not None and batch.done(i)
        if all(done):
            break
        logits, cache = student.model.decode_step(tok, cache)
    return out


@torch.no_grad()
def _generate_batch_drafted(student, rows: list[list[int]]) -> list[list[int]]:
    """`_generate_batch` under the grammar, with grammar drafts: the same tokens in fewer calls.

    After each chosen token, the tokens the grammar forces next (keys, quotes, punctuation, the
    rest of a started value) are fed with it in one call. Walking the returned logits, a draft
    token is kept only while it is the masked argmax, so every chosen token is the one
    step-by-step greedy decoding picks; the first disagreement is the next chosen token, and the
    cache drops the rejected drafts.
    """
    kept = torch.as_tensor(student.kept, dtype=torch.long)
    index = {int(t): k for k, t in enumerate(kept.tolist())}
    B = len(rows)
    walk = _DraftWalk(student, kept, student.grammar.batch(B), step_budget(student.task, student.config.max_output), B)
    logits, cache = student.model.prefill(_pad(rows))
    logits = logits[:, None]  # [B, 1 + drafts, V]: position i follows the pending token and i drafts
    pending = [[] for _ in range(B)]  # per row: the drafts fed in the last call (as output indices)
    fed = None  # real tokens each row had in the cache before the last call
    while True:
        scores = logits[:, :, :len(kept)].float()
        keep = cache.pos.clone() if fed is None else fed.clone()  # a finished row drops its filler
        for b in range(B):
            if not walk.done[b]:
                confirmed = walk.row(b, scores[b], pending[b])
                if fed is not None:
                    keep[b] = fed[b] + 1 + confirmed  # the token fed first, then the confirmed drafts
        if fed is not None:
            cache = cache.truncate(keep)
        if all(walk.done):
            break
        pending = [[] if walk.done[b] else [index[t] for t in student.grammar.forced_tokens(
            walk.batch.matchers[b], walk.budget - walk.chosen[b] - 1)] for b in range(B)]
        tok = torch.zeros(B, 1 + max(len(d) for d in pending), dtype=torch.long)
        tok[:, 0] = walk.next
        for b, d in enumerate(pending):
            tok[b, 1:1 + len(d)] = torch.tensor(d, dtype=torch.long)
        fed = cache.pos.clone()
        lengths = torch.tensor([1 + len(d) for d in pending], dtype=torch.long)
        logits, cache = student.model.decode_tokens(tok, cache, lengths)
    return walk.out


class _DraftWalk:
    """The rows of a drafted batch as greedy decoding walks them: what each has chosen so far."""

    def __init__(self, student, kept: torch.Tensor, batch, budget: int, B: int):
        self.kept, self.eos, self.batch, self.budget = kept, student.eos_id, batch, budget
        self.done = [False] * B
        self.chosen = [0] * B  # tokens chosen per row (EOS included), at most `budget`
        self.out: list[list[int]] = [[] for _ in range(B)]
        self.next = torch.zeros(B, dtype=torch.long)  # each row's token to feed next (output index)

    def row(self, b: int, scores: torch.Tensor, draft: list[int]) -> int:
        """Choose row b's tokens from its positions' scores [1 + len(draft), K]: the masked
        argmax at each, while it equals the draft; returns how many drafts were confirmed."""
        confirmed = 0
        for i in range(1 + len(draft)):
            allowed = _allowed(self.batch, [b], self.kept)[0]
            if not bool(allowed.any()):
                self.done[b] = True
                break
            k = int(scores[i].masked_fill(~allowed, float("-inf")).argmax())
            t = int(self.kept[k])
            self.batch.accept(b, t)
            self.chosen[b] += 1
            if t == self.eos:
                self.done[b] = True
            else:
                self.out[b].append(t)
                self.done[b] = self.batch.done(b)
            self.next[b] = k
            if self.done[b] or self.chosen[b] >= self.budget or i == len(draft) or k != draft[i]:
                break
            confirmed += 1
        if self.chosen[b] >= self.budget:
            self.done[b] = True
        return confirmed


def step_budget(task: Task, max_output: int) -> int:
    """Decoding steps that let any valid output finish, even one spelled a byte per token.

    The student's positions are not limited to training lengths, so under the grammar an
    untrained (or unlucky) student still reaches EOS: every token carries at least one byte,
    and a valid output has at most this many bytes. Number fields count 32 bytes: JSON numbers
    are unbounded, so only they can still run out.
    """
    n = 2 + len(task.output.fields)  # braces, commas, EOS
    if task.output.indent is not None:
        n += (task.output.indent + 1) * len(task.output.fields) + 1
    for f in task.output.fields:
        n += len(json.dumps(f.name, ensure_ascii=False).encode()) + 1
        if isinstance(f, EnumField):
            n += max(len(json.dumps(v, ensure_ascii=False).encode()) for v in f.values)
        elif isinstance(f, StringField):
            n += 2 + 6 * f.max_length  # a character can take six bytes as a \uXXXX escape
        else:
            n += 32
    return max(max_output, n)


def _allowed(batch, rows: list[int], kept: torch.Tensor) -> torch.Tensor:
    """Grammar-allowed flags at the kept ids: bool [len(rows), K].

    xgrammar's bitmask packs token id t into bit (t % 32) of int32 word t // 32.
    """
    for j, i in enumerate(rows):
        batch.matchers[i].fill_next_token_bitmask(batch.bitmask, j)
    words = batch.bitmask[: len(rows)][:, kept >> 5]
    return ((words >> (kept & 31)) & 1).bool()


@torch.no_grad()
def held_out(student, examples: list[Example], records: list, batch_size: int) -> dict[str, Any]:
    """Held-out metrics against the teacher: teacher-forced token accuracy, and free-running
    (greedy, constrained) exact match of the whole output and agreement per field."""
    if not examples:
        return {"val_examples": 0}
    model, was_training = student.model, student.model.training
    model.eval()
    right = total = 0
    for i in range(0, len(examples), batch_size):
        b = collate(examples[i:i + batch_size], len(student.kept))
        pred = model(b.inp, b.out_in)[..., : b.n_kept].argmax(-1)
        right += int(((pred == b.target) & b.mask).sum())
        total += int(b.mask.sum())
    model.train(was_training)
    outs = generate(student, [r.input_ids for r in records], constrain=True, batch_size=max(batch_size, 64))
    tok, task = student.tokenizer, student.task
    exact, agree = 0, {name: 0 for name in task.field_names}
    for r, out in zip(records, outs):
        text = tok.decode(out)
        exact += text == tok.decode(r.output_ids[:-1])
        fields_ = parse_or_none(task, text) or {}
        for name in agree:
            agree[name] += fields_.get(name, object()) == r.fields.get(name)
    n = len(records)
    return {"val_examples": n, "val_token_acc": right / max(total, 1), "val_exact_match": exact / n,
            "val_field_agreement": {k: v / n for k, v in agree.items()}}
