"""What a shard folder holds, checked against its checksums: the `inspect` verb.

    microdistill inspect runs/demo/shards
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from microdistill.data.shards import ShardSet, StoreError


def inspect(path: str | Path) -> dict[str, Any]:
    """Summary of a shard folder, after checking every shard against its manifest checksum."""
    shards = ShardSet(Path(path), verify=True)
    m = shards.manifest
    for key in ("task", "teacher", "vocab"):
        if key not in m:
            raise StoreError(f"{shards.dir / 'manifest.json'}: no {key!r} entry (not written by microdistill extract)")
    from microdistill.core.task import EnumField

    task = shards.task()
    records = list(shards.records())
    per_field: dict[str, Counter] = {f.name: Counter() for f in task.output.fields if isinstance(f, EnumField)}
    agree: Counter = Counter()
    for r in records:
        for name, counts in per_field.items():
            counts[r.fields[name]] += 1
        for name, value in (r.labels or {}).items():
            if name in r.fields:
                agree[name, str(r.fields[name]) == value] += 1
    n = len(records)
    total_bytes = sum(s["bytes"] for s in m["shards"])
    return {
        "path": str(shards.dir),
        "task": task.name,
        "teacher": m["teacher"],
        "complete": bool(m.get("complete")),
        "counts": {"examples": n, "train": sum(r.split == "train" for r in records),
                   "val": sum(r.split == "val" for r in records), "shards": len(m["shards"])},
        "labels": {name: dict(c.most_common()) for name, c in per_field.items()},
        "human_agreement": {name: agree[name, True] / (agree[name, True] + agree[name, False])
                            for name in sorted({k for k, _ in agree})},
        "vocab": {"kept": len(m["vocab"]["kept"]), "required": m["vocab"]["n_required"],
                  "input": len(m["vocab"]["input"]), "coverage": m["vocab"]["coverage"]},
        "output_tokens_mean": float(np.mean([len(r.output_ids) for r in records])) if n else 0.0,
        "bytes_per_example": total_bytes / n if n else 0.0,
        "bytes": total_bytes,
        "timings": m.get("timings", {}),
        "filters": m.get("filters", {}),
    }


def summary(info: dict[str, Any]) -> str:
    """The lines `microdistill inspect` prints for an `inspect` result."""
    c, v, t = info["counts"], info["vocab"], info["timings"]
    lines = [f"{info['path']}: task {info['task']}, teacher {info['teacher']['name']} "
             f"({'complete' if info['complete'] else 'incomplete: re-run extract to continue'})",
             f"examples: {c['examples']} ({c['train']} train, {c['val']} val) in {c['shards']} shards, "
             f"{info['bytes_per_example'] / 1024:.1f} KiB per example, {info['output_tokens_mean']:.1f} output tokens",
             f"vocabulary: {v['kept']} kept output tokens ({v['required']} required, "
             f"{v['coverage']:.2%} of teacher mass), {v['input']} input tokens"]
    lines += [f"  {name}: " + ", ".join(f"{k} {n}" for k, n in counts.items()) for name, counts in info["labels"].items()]
    lines += [f"  teacher vs human labels, {name}: {acc:.2%}" for name, acc in info["human_agreement"].items()]
    if t:
        lines.append(f"timings: {t.get('examples_per_s', 0):.2f} examples/s, {t.get('tokens_per_s', 0):.1f} tokens/s, "
                     f"calibration {t.get('calibrate_s', 0):.1f} s, total {t.get('extract_s', 0):.1f} s")
    return "\n".join(lines)
