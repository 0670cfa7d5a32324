"""The teacher's logits along answers it did not write (on-policy distillation scores a student's).

    from microdistill.teachers.scoring import teacher_forced
    rows = teacher_forced(decoder, [decoder.rest_ids(t) for t in texts], answers, kept)

One forward pass per batch over `rest + answer[:-1]` after the decoder's cached prompt prefix,
laid out as decoding lays out its rows (decoding.py), so a row's logits at the positions of its
own answer are those the teacher decoded it with.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch


@torch.inference_mode()
def teacher_forced(decoder, rests: list[list[int]], answers: list[list[int]],
                   kept: Sequence[int]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per row (raw logits at the kept ids float32 [len(answer), K], log-sum-exp over the whole
    vocabulary float32 [len(answer)]): what the teacher predicts for each answer token, given the
    prompt and the answer before it."""
    # the last answer token is predicted, never fed
    ids, attn, pos = decoder.rows_after_prefix([r + a[:-1] for r, a in zip(rests, answers)])
    dev = decoder.device
    logits = decoder.model(input_ids=ids.to(dev), attention_mask=attn.to(dev), position_ids=pos.to(dev),
                           past_key_values=decoder.cache_for(len(rests)), use_cache=True).logits
    keep = torch.as_tensor(list(kept), dtype=torch.long, device=dev)
    rows = []
    for b, (rest, answer) in enumerate(zip(rests, answers)):
        raw = logits[b, len(rest) - 1: len(rest) - 1 + len(answer)].float()
        rows.append((raw[:, keep].cpu().numpy(), torch.logsumexp(raw, -1).cpu().numpy()))
    return rows
