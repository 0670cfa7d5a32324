"""What every student kind's training run is made of, and the optimiser they share."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from microdistill.data.shards import ShardSet
from microdistill.train.config import TrainConfig
from microdistill.train.probe import HiddenProbe


@dataclass
class Setup:
    """Everything a run is made of before its first step: the data, the student, and what its
    kind does with them (batch, loss, held-out evaluation, saving)."""

    shards: ShardSet
    use_logits: bool
    train_set: list
    model: nn.Module
    probe: HiddenProbe | None
    opt: torch.optim.AdamW
    total: int
    collate: Callable[[list], Any]  # examples -> a batch with n_tokens
    loss: Callable  # forward_loss(model, batch, cfg, w_div, progress, probe) -> (parts, accuracy)
    evaluate: Callable[[], dict[str, Any]]  # held-out metrics (evaluate_epoch's keys)
    save: Callable[[Path], None]  # write the student folder
    info: dict[str, Any]  # what training.json records about the setup
    title: str  # one line naming the student, for the progress display


def make_optimizer(model: nn.Module, cfg: TrainConfig, probe: HiddenProbe | None = None,
                   pretrained: list[nn.Parameter] | None = None) -> torch.optim.AdamW:
    """AdamW; parameters in `pretrained` (a pretrained encoder's) learn at lr·pretrained_lr_ratio
    (a group's `lr_scale`): new heads need large steps, pretrained weights small ones."""
    # Decay matrices and embeddings only: shrinking a norm gain towards 0 fights the (1 + w) form.
    params = list(model.parameters()) + (list(probe.parameters()) if probe is not None else [])
    slow = {id(p) for p in pretrained or []}
    groups = []
    for scale, members in ((1.0, [p for p in params if id(p) not in slow]),
                           (cfg.pretrained_lr_ratio, [p for p in params if id(p) in slow])):
        if members:
            extra = {"lr_scale": scale} if scale != 1.0 else {}
            groups += [{"params": [p for p in members if p.dim() >= 2], "weight_decay": cfg.weight_decay, **extra},
                       {"params": [p for p in members if p.dim() < 2], "weight_decay": 0.0, **extra}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
