"""The classifier-head model: one encoder pass, one softmax per enum field over its values;
its examples, batches and held-out metrics.

For a task whose fields are all enums, the teacher's whole answer is a few decisions; its
shards keep, for each, the teacher's probability of every allowed value (the decision points,
see generation.py). This student reads the input with a pretrained encoder (encoder.py),
mean-pools the final states over the real tokens, and has one linear head per field. Its
answer is the most probable value of each field, assembled into the task's canonical JSON, so
it is always valid; each field's softmax probability is its confidence.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from microdistill.core.task import EnumField
from microdistill.data.shards import Record

MAX_LENGTH = 128  # WordPiece tokens per input; the task's inputs are far shorter


class HeadsStudent(nn.Module):
    """encoder -> mean of the final states over real tokens -> dropout -> one linear head per field."""

    def __init__(self, encoder: nn.Module, sizes: Sequence[int], dropout: float = 0.0):
        super().__init__()
        self.encoder = encoder
        d = encoder.config.hidden_size
        self.drop = nn.Dropout(dropout)
        self.heads = nn.ModuleList(nn.Linear(d, n) for n in sizes)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.encoder.get_input_embeddings()

    def pooled(self, ids: Tensor, mask: Tensor) -> Tensor:
        """ids, mask [B, L] -> [B, D]: the final hidden states averaged over the real tokens."""
        h = self.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        m = mask.unsqueeze(-1).to(h.dtype)
        return (h * m).sum(1) / m.sum(1).clamp_min(1)

    def forward(self, ids: Tensor, mask: Tensor) -> list[Tensor]:
        """One logits tensor [B, n_values] per field, in the task's field order."""
        x = self.drop(self.pooled(ids, mask))
        return [head(x) for head in self.heads]


# ---- data ---------------------------------------------------------------------------------------
@dataclass
class HeadsBatch:
    """ids, mask [B, L]; target [B, F] the teacher's value index per field; teacher: per field
    log P_teacher [B, n_values] from the decision points, or None (text-only shards)."""

    ids: Tensor
    mask: Tensor
    target: Tensor
    teacher: list[Tensor] | None
    n_tokens: int


@dataclass
class HeadsExample:
    ids: list[int]
    target: list[int]
    decisions: list[np.ndarray] | None


def token_ids(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """The body's input ids of each text, untruncated: from a WordPiece `tokenizers.Tokenizer`
    (special tokens included), or from the teacher's tokenizer for a body cut from the teacher
    (TeacherTokens, which encodes alike)."""
    return [enc.ids for enc in tokenizer.encode_batch(list(texts))]


def encode_texts(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    return [x[:MAX_LENGTH] for x in token_ids(tokenizer, texts)]


def examples_of(records: Sequence[Record], tokenizer, fields: list[EnumField], use_decisions: bool) -> list[HeadsExample]:
    ids = encode_texts(tokenizer, [r.text for r in records])
    out = []
    for r, x in zip(records, ids):
        target = [f.values.index(r.fields[f.name]) for f in fields]
        dec = [np.asarray(r.decisions[f.name], dtype=np.float32) for f in fields] if use_decisions else None
        out.append(HeadsExample(x, target, dec))
    return out


def collate_heads(examples: list[HeadsExample]) -> HeadsBatch:
    B, L = len(examples), max(len(e.ids) for e in examples)
    ids = torch.zeros(B, L, dtype=torch.long)
    mask = torch.zeros(B, L, dtype=torch.long)
    for i, e in enumerate(examples):
        ids[i, : len(e.ids)] = torch.tensor(e.ids)
        mask[i, : len(e.ids)] = 1
    target = torch.tensor([e.target for e in examples], dtype=torch.long)
    teacher = None
    if examples[0].decisions is not None:
        # log P over the values; a value the teacher gave no mass keeps a finite floor
        teacher = [torch.from_numpy(np.stack([e.decisions[k] for e in examples])).clamp_min(1e-12).log()
                   for k in range(len(examples[0].decisions))]
    return HeadsBatch(ids, mask, target, teacher, int(mask.sum()))


@torch.no_grad()
def held_out(model: HeadsStudent, fields: list[EnumField], examples: list[HeadsExample], batch_size: int) -> dict[str, Any]:
    """The decoder's held-out metrics for a classifier-head student: exact match of the whole
    answer, agreement per field, and as `val_token_acc` the share of decisions (field values)
    that agree."""
    if not examples:
        return {"val_examples": 0}
    was_training = model.training
    model.eval()
    picks = []
    for i in range(0, len(examples), batch_size):
        b = collate_heads(examples[i:i + batch_size])
        picks.append(torch.stack([z.argmax(-1) for z in model(b.ids, b.mask)], 1))
    model.train(was_training)
    right = torch.cat(picks) == torch.tensor([e.target for e in examples])  # [N, F]
    n = len(examples)
    return {"val_examples": n, "val_token_acc": int(right.sum()) / right.numel(),
            "val_exact_match": int(right.all(1).sum()) / n,
            "val_field_agreement": {f.name: int(right[:, k].sum()) / n for k, f in enumerate(fields)}}
