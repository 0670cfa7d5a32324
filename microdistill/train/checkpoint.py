"""Checkpoints: everything needed to continue a training run bit for bit.

`out/checkpoint/state.pt` holds weights, optimiser, RNG states, the loop's position (epoch,
batch within it, step), the options and a fingerprint of the shards; `meta.json` the same
without tensors, for people. The folder is replaced as a whole, so a crash while saving
leaves the previous checkpoint (as `.checkpoint.old`) to resume from.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from microdistill.core.files import atomic_dir, atomic_write_json
from microdistill.data.shards import ShardSet
from microdistill.train.config import TrainConfig, TrainError
from microdistill.train.probe import HiddenProbe

# What checkpoints written before these options were trained with: random input embeddings,
# no hidden-state loss, no dropout.
LEGACY = {"embed_init": "random", "hidden_weight": 0.0, "dropout": 0.0, "input_vocab": "corpus"}


def shard_fingerprint(shards: ShardSet, n_train: int) -> dict[str, Any]:
    """What a checkpoint must agree with to be continued on these shards."""
    m = shards.manifest
    kept = json.dumps([int(i) for i in shards.kept_vocab]).encode()
    return {"task": m.get("task_fingerprint") or shards.task().fingerprint(),
            "teacher": (m.get("teacher") or {}).get("sha256"), "kept vocabulary": hashlib.sha256(kept).hexdigest()[:16],
            "number of training examples": n_train, "hidden layer": m.get("hidden_layer")}


def has_run(out: Path) -> bool:
    return any((out / name).exists() for name in ("checkpoint", ".checkpoint.old", "model.safetensors"))


def rng_state() -> dict[str, Any]:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)]}


def set_rng_state(s: dict[str, Any]) -> None:
    torch.set_rng_state(s["torch"])
    random.setstate(s["python"])
    kind, keys, pos, has_gauss, gauss = s["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))


def save_checkpoint(out: Path, model: nn.Module, opt: torch.optim.Optimizer, cfg: TrainConfig,
                    fingerprint: dict, state: dict[str, Any], probe: HiddenProbe | None = None) -> None:
    """out/checkpoint/{state.pt, meta.json}, replaced as a whole (files.atomic_dir)."""
    blob = {"model": model.state_dict(), "optimizer": opt.state_dict(), "rng": rng_state(),
            "probe": probe.state_dict() if probe is not None else None,
            "scheduler": {"kind": "warmup-cosine", "step": state["step"]}, "config": cfg.to_dict(),
            "student": model.config.to_dict() if hasattr(model, "config") else None, "fingerprint": fingerprint, **state}
    with atomic_dir(out / "checkpoint") as tmp:
        torch.save(blob, tmp / "state.pt")
        atomic_write_json(tmp / "meta.json", {"config": cfg.to_dict(), "fingerprint": fingerprint, **state})


def load_checkpoint(out: Path, model: nn.Module, opt: torch.optim.Optimizer, cfg: TrainConfig,
                    fingerprint: dict, probe: HiddenProbe | None = None) -> dict[str, Any]:
    """Restore weights, optimiser and RNG states in place; returns the loop state."""
    path = next((p for p in (out / "checkpoint" / "state.pt", out / ".checkpoint.old" / "state.pt") if p.is_file()), None)
    if path is None:
        raise TrainError(f"{out}: no checkpoint to resume from; run without --resume")
    try:
        blob = torch.load(path, weights_only=True, map_location="cpu")  # a GPU run's checkpoint loads anywhere
    except Exception as e:  # torch raises several types for truncated or foreign files
        raise TrainError(f"{path}: corrupted checkpoint ({type(e).__name__}); delete {path.parent} to start over") from None
    for key, value in fingerprint.items():
        if blob["fingerprint"].get(key) != value:
            raise TrainError(f"{path}: trained on shards with a different {key}; these shards cannot continue it "
                             "(use another --out)")
    diff = cfg.differences(blob["config"], legacy=LEGACY, ignore=("eval_limit",))
    if diff:
        raise TrainError(f"{path}: saved with other training options ({', '.join(diff)}); resume with the same options")
    model.load_state_dict(blob["model"])
    if probe is not None:
        probe.load_state_dict(blob["probe"])
    opt.load_state_dict(blob["optimizer"])
    set_rng_state(blob["rng"])
    return {k: blob[k] for k in ("epoch", "batch", "step", "tokens", "train_s", "wall_s")}
