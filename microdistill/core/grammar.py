"""Schema-constrained decoding with xgrammar, shared by the teacher and the student.

xgrammar compiles the task's JSON schema for a tokenizer once (a few hundred ms) and then
answers "which tokens may come next?" as a bitmask in microseconds per step, on the CPU,
with a persistent stack instead of re-running a regex automaton per token. It is what vLLM
and SGLang ship, it takes a Hugging Face tokenizer directly, and it has a CPU kernel to apply
the mask to a batch of logits. (outlines-core needs a regex and an index rebuilt per
vocabulary; llguidance is equally capable but its Python API is lower level.)

The grammar mask is intersected with the kept vocabulary: the student can only say kept
tokens, so the teacher must only choose kept tokens. The kept set always contains a
single-character token for every character a valid output can use (see vocab.py), so the
intersection never leaves a prefix without a continuation.
"""

from __future__ import annotations

import json
from typing import Sequence

import torch
import xgrammar as xgr

from microdistill.core.task import Task


class Grammar:
    """A task's output language for one tokenizer, optionally limited to `allowed` ids.

    Args:
        vocab_size: the model's logit width (may exceed `len(tokenizer)` by padding rows).
        allowed: teacher token ids that may ever be chosen (the kept vocabulary), or None.
    """

    def __init__(self, task: Task, tokenizer, vocab_size: int, eos_id: int, allowed: Sequence[int] | None = None):
        self.task = task
        self.tokenizer = tokenizer
        self.allowed = None if allowed is None else {int(i) for i in allowed}
        self.vocab_size = vocab_size
        self.eos_id = eos_id
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=[eos_id])
        schema = json.dumps(task.json_schema())
        compiler = xgr.GrammarCompiler(info, max_threads=1)
        if task.output.indent is None:
            self.compiled = compiler.compile_json_schema(schema, any_whitespace=False, separators=(",", ":"))
        else:
            self.compiled = compiler.compile_json_schema(schema, any_whitespace=False, indent=task.output.indent)
        self.bias = torch.zeros(vocab_size)
        if allowed is not None:
            self.bias.fill_(float("-inf"))
            self.bias[torch.as_tensor(list(allowed), dtype=torch.long)] = 0.0

    def batch(self, n: int) -> "ConstrainedBatch":
        return ConstrainedBatch(self, n)

    def forced_tokens(self, matcher: xgr.GrammarMatcher, limit: int) -> list[int]:
        """Token ids the grammar forces next, at most `limit`: its jump-forward string in the
        tokenizer's own segmentation (EOS once the object is complete), cut at the first token
        outside `allowed`, which could never be chosen. The matcher is left as it was.

        Teacher and student both feed these "drafts" in one model call and keep the prefix
        their own masked greedy choice agrees with: exact greedy decoding in fewer calls.
        """
        ids: list[int] = []
        while len(ids) < limit:
            text = matcher.find_jump_forward_string()
            if text:
                new = [int(t) for t in self.tokenizer(text, add_special_tokens=False).input_ids]
            elif matcher.is_completed() and not matcher.is_terminated():
                new = [self.eos_id]
            else:
                break
            n = 0
            while (n < len(new) and len(ids) < limit and (self.allowed is None or new[n] in self.allowed)
                   and matcher.accept_token(new[n])):
                ids.append(new[n])
                n += 1
            if n < len(new) or matcher.is_terminated():
                break
        if ids:
            matcher.rollback(len(ids))
        return ids


class ConstrainedBatch:
    """Per-row grammar state for `n` sequences decoded together."""

    def __init__(self, grammar: Grammar, n: int):
        self.g = grammar
        self.matchers = [xgr.GrammarMatcher(grammar.compiled) for _ in range(n)]
        self.bitmask = xgr.allocate_token_bitmask(n, grammar.vocab_size)
        self.finished = [False] * n

    def mask_(self, logits: torch.Tensor, rows: Sequence[int] | None = None) -> torch.Tensor:
        """Set every token that is not allowed next to -inf, in place. logits: [len(rows), V] float32."""
        rows = list(range(len(self.matchers))) if rows is None else list(rows)
        for j, i in enumerate(rows):
            self.matchers[i].fill_next_token_bitmask(self.bitmask, j)
        xgr.apply_token_bitmask_inplace(logits, self.bitmask[: len(rows)].to(logits.device))
        logits += self.g.bias.to(logits.device)
        return logits

    def accept(self, row: int, token: int) -> None:
        if not self.matchers[row].accept_token(int(token)):
            raise RuntimeError(f"token {token} rejected by the grammar (row {row})")
        if int(token) == self.g.eos_id or self.matchers[row].is_terminated():
            self.finished[row] = True

    def done(self, row: int) -> bool:
        return self.finished[row]
