"""A decoder student's view of shard records: examples in its own indices, and padded batches.

Shards store teacher token ids; a decoder has its own input and output indices (config.py).
Training and evaluation both read records through `examples_of`, so they see the same examples
the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from microdistill.data.shards import Record, ShardSet, StoreError
from microdistill.students.decoder.config import N_SPECIAL


@dataclass
class Example:
    """One example in student indices: inp [Li] input indices, out [Lo] output indices ending
    with EOS; logits float16 [Lo, K] and lse float32 [Lo] when the teacher's logits are used;
    hidden float16 [H], the teacher's input hidden state, when hidden-state distillation is on;
    target [Lo], the tokens the CE term aims at where they are not `out` (the teacher's choice
    along an answer the student wrote: train/on_policy.py)."""

    inp: list[int]
    out: list[int]
    logits: np.ndarray | None
    lse: np.ndarray | None
    hidden: np.ndarray | None = None
    target: list[int] | None = None


@dataclass
class Batch:
    """inp [B, Li] (PAD right), out_in [B, Lo-1] (previous outputs), target [B, Lo], mask [B, Lo]
    (True at real output positions), teacher [B, Lo, K] float32 and lse [B, Lo] or None,
    hidden [B, H] float32 (the teacher's input hidden states) or None."""

    inp: torch.Tensor
    out_in: torch.Tensor
    target: torch.Tensor
    mask: torch.Tensor
    teacher: torch.Tensor | None
    lse: torch.Tensor | None
    n_kept: int
    n_tokens: int  # sequence positions through the model (BOS, input, SEP, outputs), for tokens/s
    hidden: torch.Tensor | None = None


def load_split(shards: ShardSet, split: str, use_logits: bool, limit: int | None,
               allow_empty: bool = False, use_hidden: bool = False) -> tuple[list[Example], list[Record]]:
    """The first `limit` examples of a split, mapped from teacher ids to student indices."""
    records = list(shards.records(split))[:limit]
    if not records and not allow_empty:
        raise StoreError(f"shard folder {shards.dir}: no {split} examples")
    where = f"shard folder {shards.dir}"
    return examples_of(records, shards.input_vocab, shards.kept_vocab, use_logits, use_hidden, where), records


def examples_of(records: Sequence[Record], input_vocab, kept, use_logits: bool, use_hidden: bool = False,
                where: str = "shards") -> list[Example]:
    """`records` in the indices of a student with these vocabularies (teacher ids, in order)."""
    in_index = {int(t): N_SPECIAL + p for p, t in enumerate(input_vocab)}
    out_index = {int(t): k for k, t in enumerate(kept)}
    examples = []
    for r in records:
        try:
            inp = [in_index[int(i)] for i in r.input_ids]
            out = [out_index[int(i)] for i in r.output_ids]
        except KeyError as e:
            raise StoreError(f"{where}: example {r.id} uses teacher token {e.args[0]} outside "
                             "the manifest's vocabulary (mixed or corrupted shards); extract again") from None
        if use_hidden and r.hidden is None:
            raise StoreError(f"{where}: example {r.id} has no teacher hidden state although the "
                             "manifest says every example has one (mixed or corrupted shards); extract again")
        examples.append(Example(inp, out, r.logits if use_logits else None, r.lse if use_logits else None,
                                r.hidden if use_hidden else None))
    return examples


def collate(examples: list[Example], n_kept: int) -> Batch:
    B, Li, Lo = len(examples), max(len(e.inp) for e in examples), max(len(e.out) for e in examples)
    inp = torch.zeros(B, Li, dtype=torch.long)
    out_in = torch.zeros(B, max(Lo - 1, 0), dtype=torch.long)
    target = torch.zeros(B, Lo, dtype=torch.long)
    mask = torch.zeros(B, Lo, dtype=torch.bool)
    with_logits = examples[0].logits is not None
    teacher = torch.zeros(B, Lo, n_kept) if with_logits else None
    lse = torch.zeros(B, Lo) if with_logits else None
    for i, e in enumerate(examples):
        n = len(e.out)
        inp[i, : len(e.inp)] = torch.tensor(e.inp)
        out_in[i, : n - 1] = torch.tensor(e.out[:-1])
        target[i, :n] = torch.tensor(e.out if e.target is None else e.target)
        mask[i, :n] = True
        if with_logits:
            teacher[i, :n] = torch.from_numpy(e.logits.astype(np.float32))
            lse[i, :n] = torch.from_numpy(e.lse)
    n_tokens = sum(len(e.inp) + 1 + len(e.out) for e in examples)
    hidden = torch.from_numpy(np.stack([e.hidden for e in examples]).astype(np.float32)) if examples[0].hidden is not None else None
    return Batch(inp, out_in, target, mask, teacher, lse, n_kept, n_tokens, hidden)
