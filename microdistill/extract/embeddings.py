"""The teacher's reading of each input token in context: a decoder student's starting input rows.

Written once per shard folder as input_embeddings.safetensors (one float16 row per id of the
input vocabulary): by `extract --embeddings`, or by `add_input_embeddings` when a decoder
student first needs them (a heads student never reads them, so extraction does not pay for them).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from microdistill.core.console import progress as progress_bar
from microdistill.core.console import say
from microdistill.core.files import atomic_write_bytes, atomic_write_json
from microdistill.data.shards import INPUT_EMBEDDINGS, ShardSet, read_manifest, rows_sha256
from microdistill.teachers import TeacherError, load_teacher, recorded_spec
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
    rows = rows.half().contiguous()
    atomic_write_bytes(dest, save({"rows": rows}, metadata={"sha256": rows_sha256(rows)}))


def add_input_embeddings(shards: ShardSet, progress: bool = True) -> None:
    """Compute and store the input embeddings of a shard folder made without them, from the teacher
    its manifest names, in the dtype it labelled in, over the texts it labelled. A folder whose
    teacher cannot be loaded here is a TeacherError naming the command that fixes it."""
    recorded = shards.manifest.get("teacher") or {}
    spec = recorded_spec(recorded)
    try:
        teacher = load_teacher(spec, progress=progress)
    except Exception as e:  # a missing preset, a moved folder, a damaged file: say which and what to do
        raise TeacherError(f"shard folder {shards.dir}: holds no input embeddings, which a decoder student starts "
                           f"from, and its teacher {spec!r} cannot be loaded here ({str(e).splitlines()[0][:160]}); "
                           "run microdistill extract --embeddings with the same --input and --out where the teacher "
                           "is, or train with --embed-init random") from None
    if getattr(teacher, "access", "") != "white":
        raise TeacherError(f"shard folder {shards.dir}: its teacher {spec!r} is served; input embeddings need a local "
                           "teacher's states; train with --embed-init random")
    teacher.to_dtype(recorded.get("dtype", "float32"))
    say(f"{shards.dir}: computing the teacher's input embeddings once (a decoder student starts from them)", progress)
    save_input_embeddings(teacher, [int(i) for i in shards.input_vocab], [r.text for r in shards.records()],
                          shards.dir, replace=True, progress=progress)
    manifest = read_manifest(shards.dir)  # the root's own manifest, not the one read with its parts
    atomic_write_json(shards.dir / "manifest.json", {**manifest, "input_embeddings": INPUT_EMBEDDINGS})
    shards.manifest["input_embeddings"] = INPUT_EMBEDDINGS
