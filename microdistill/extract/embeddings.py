"""The teacher's reading of each input token in context: a decoder student's starting input rows.

Written once per shard folder as input_embeddings.safetensors (one float16 row per id of the
input vocabulary), when the folder is made by a local teacher.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from microdistill.core.console import progress as progress_bar
from microdistill.core.files import atomic_write_bytes
from microdistill.data.shards import INPUT_EMBEDDINGS
from microdistill.teachers.hf import HFTeacher, hidden_layer_of, states_after


def save_input_embeddings(teacher: HFTeacher, input_ids: Sequence[int], texts: Sequence[str], out_dir: Path,
                           replace: bool, progress: bool = False) -> None:
    """out_dir/input_embeddings.safetensors: one teacher vector per input-vocabulary id (float16),
    a student's starting point; written atomically, and when the file is already there only if
    `replace` (a new vocabulary: the file may be a leftover).

    A token the corpus uses gets its meaning in context: the teacher's hidden state after its
    middle layer, averaged over the token's occurrences in `texts` (each text read alone). A
    static embedding row knows little more than spelling (a student started from it learned no
    faster than from random rows); the middle layer knows that "crashes" or "peeling" is a
    complaint. Other ids (byte fallbacks, specials) keep their static rows, and the contextual
    rows are rescaled per dimension to the static rows' mean and spread so both mix.
    """
    from safetensors.torch import save

    dest = out_dir / INPUT_EMBEDDINGS
    if dest.is_file() and not replace:
        return
    ids = [int(i) for i in input_ids]
    weight = teacher.model.get_input_embeddings().weight
    with torch.no_grad():
        rows = weight[torch.as_tensor(ids, dtype=torch.long, device=weight.device)].double().cpu()
    row_of = {t: k for k, t in enumerate(ids)}
    total = torch.zeros_like(rows)
    count = torch.zeros(len(ids), dtype=torch.float64)
    layer = hidden_layer_of(teacher, "middle")
    seqs = sorted((s for s in teacher.tokenizer(list(texts), add_special_tokens=False).input_ids if s), key=len)
    bar, job = progress_bar(progress, "reading inputs in context", len(seqs))
    with bar, torch.inference_mode():
        for k in range(0, len(seqs), 32):
            chunk = seqs[k:k + 32]
            width = max(len(q) for q in chunk)
            batch = torch.full((len(chunk), width), teacher.pad_id, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for b, q in enumerate(chunk):  # right padding: causal attention keeps real tokens exact
                batch[b, :len(q)], mask[b, :len(q)] = torch.tensor(q), 1
            states = states_after(teacher.model, layer, input_ids=batch.to(weight.device), attention_mask=mask.to(weight.device))
            for b, q in enumerate(chunk):
                at = torch.tensor([row_of[t] for t in q])
                total.index_add_(0, at, states[b, :len(q)].double().cpu())
                count.index_add_(0, at, torch.ones(len(q), dtype=torch.float64))
            bar.advance(job, len(chunk))
    seen = count > 0
    if seen.sum() > 1:
        ctx = total[seen] / count[seen, None]
        ctx = (ctx - ctx.mean(0)) / ctx.std(0).clamp_min(1e-6)
        rows[seen] = ctx * rows[seen].std(0) + rows[seen].mean(0)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(dest, save({"rows": rows.half().contiguous()}))
