"""A decoder student as the teacher's draft (speculative decoding with a distilled draft).

    microdistill extract --task support-ticket --input more.jsonl --out shards/ --draft runs/t/student
    extract(corpus, out, cfg, drafter_for=draft_loader(cfg))     # the same from Python

At each decoding step the student reads the input and the teacher's answer so far (and the
tokens the grammar forces next) and proposes the next --draft-tokens tokens greedily; the
teacher checks the whole draft in its one forward pass and keeps the tokens that are its own
masked argmax (teachers/decoding.py), so the answers are exactly those of decoding without a
draft: the student only changes how many teacher passes they take. Its cache holds the input and
the confirmed answer; what it proposes is dropped again after each step.

Only a decoder student of the same task, with the teacher's tokenizer, can draft: its outputs
are teacher token ids.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from microdistill.core.task import Task
from microdistill.extract.config import ExtractConfig, ExtractError

DRAFT_TOKENS = ExtractConfig.draft_tokens  # tokens a draft proposes per step, unless told


class StudentDraft:
    """Proposals of a LoadedDecoder for one batch of teacher rows at a time (start, then propose)."""

    def __init__(self, student, tokens: int):
        self.student, self.tokens = student, tokens
        self.kept = torch.as_tensor(student.kept, dtype=torch.long)
        self.index = {int(t): k for k, t in enumerate(student.kept)}
        self.proposed = self.accepted = 0
        self.cache = None

    def start(self, texts: list[str]) -> None:
        """Read a new batch's inputs (the rows of the teacher's batch, in order)."""
        from microdistill.students.decoder.predict import _pad

        s = self.student
        limit, index = s.config.max_input, s.input_index
        rows = [[index[int(i)] for i in s.encoder.encode(t)][:limit] for t in texts]
        s.model.eval()
        _, self.cache = s.model.prefill(_pad(rows))
        self.fed = [0] * len(texts)  # answer tokens each row's cache holds
        self.alive = set(range(len(texts)))  # rows whose answer stays inside the student's vocabulary

    @torch.no_grad()
    def propose(self, answers: dict[int, list[int]], forced: dict[int, list[int]], budgets: dict[int, int]) -> dict[int, list[int]]:
        """Up to budgets[b] tokens (teacher ids) to follow each row's answer so far and its forced
        tokens; {} for rows the student cannot follow."""
        B = len(self.fed)
        new: dict[int, list[int]] = {}
        for b in answers:
            ids = answers[b][self.fed[b]:] + forced[b]
            if b in self.alive and budgets[b] > 0 and all(t in self.index for t in ids):
                new[b] = [self.index[t] for t in ids]
            else:
                self.alive.discard(b)
        if not new:
            return {}
        tok = torch.zeros(B, max(len(x) for x in new.values()), dtype=torch.long)
        lengths = torch.zeros(B, dtype=torch.long)
        for b, x in new.items():
            tok[b, :len(x)], lengths[b] = torch.tensor(x), len(x)
        keep = self.cache.pos + torch.tensor([len(answers[b]) - self.fed[b] if b in new else 0 for b in range(B)])
        logits, cache = self.student.model.decode_tokens(tok, self.cache, lengths)
        last = logits[torch.arange(B), (lengths - 1).clamp_min(0), :len(self.kept)]
        out: dict[int, list[int]] = {b: [] for b in new}
        open_ = set(new)
        for _ in range(max(budgets[b] for b in new)):
            pick = last.argmax(-1)
            for b in list(open_):
                out[b].append(int(self.kept[pick[b]]))
                if out[b][-1] == self.student.eos_id or len(out[b]) >= min(self.tokens, budgets[b]):
                    open_.discard(b)
            if not open_:
                break
            step, cache = self.student.model.decode_step(pick, cache)
            last = step[:, :len(self.kept)]
        self.cache = cache.truncate(keep)
        for b in new:
            self.fed[b] = len(answers[b])
        self.proposed += sum(len(x) for x in out.values())
        return out

    def report(self) -> dict[str, Any]:
        return {"student": str(self.student.path), "tokens": self.tokens, "proposed": self.proposed,
                "accepted": self.accepted, "acceptance": round(self.accepted / max(self.proposed, 1), 4)}


def draft_loader(cfg: ExtractConfig):
    """extract()'s `drafter_for` for cfg.draft (None without one): extraction sits before the
    students in the stage order, so the caller hands it the loader."""
    if cfg.draft is None:
        return None
    return lambda teacher, task: load_draft(cfg.draft, teacher, task, cfg.draft_tokens)


def load_draft(path: str | Path, teacher, task: Task, tokens: int) -> StudentDraft:
    """The student at `path` as a draft for `teacher` on `task`; one-line ExtractError otherwise."""
    from microdistill.students import StudentFolderError, load_student

    try:
        student = load_student(Path(path))
    except StudentFolderError as e:
        raise ExtractError(f"--draft {path}: {e}") from None
    return check_draft(student, teacher, task, tokens, f"--draft {path}")


def check_draft(student, teacher, task: Task, tokens: int, where: str) -> StudentDraft:
    """A loaded student as a draft for `teacher` on `task`, if it can be one (else ExtractError)."""
    if getattr(student, "kind", None) != "decoder":
        raise ExtractError(f"{where}: a {getattr(student, 'kind', 'non-decoder')} student has no tokens to propose; give a decoder student")
    if student.task.fingerprint() != task.fingerprint():
        raise ExtractError(f"{where}: a student of task {student.task.name!r}, not of the task extracted ({task.name!r})")
    if student.tokenizer.get_vocab() != teacher.tokenizer.get_vocab() or student.eos_id != teacher.eos_id:
        raise ExtractError(f"{where}: its tokenizer is not the teacher's ({teacher.name}); a draft must propose the "
                           "teacher's own tokens")
    if int(max(student.kept)) >= teacher.vocab_size:
        raise ExtractError(f"{where}: its kept vocabulary holds ids the teacher ({teacher.name}) does not have")
    return StudentDraft(student, tokens)
