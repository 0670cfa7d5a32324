"""The hidden-state probe: how a student's reading of an input is compared with the teacher's."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from microdistill.train.losses import hidden_state_sums
from microdistill.students.decoder.model import INIT_STD


class HiddenProbe(nn.Module):
    """A linear map from the student's pooled input representation [B, D] to the teacher's input
    hidden state [B, H], each dimension standardised with the training set's mean and spread (so
    every dimension counts alike and the loss starts near 1). It is trained beside the student
    and kept in checkpoints, never in the student folder: predicting needs none of it."""

    def __init__(self, d_model: int, targets: np.ndarray):
        super().__init__()
        t = torch.from_numpy(np.asarray(targets, dtype=np.float32))
        self.register_buffer("mean", t.mean(0))
        self.register_buffer("std", t.std(0).clamp_min(1e-4))
        self.proj = nn.Linear(d_model, t.shape[1], bias=False)
        nn.init.normal_(self.proj.weight, 0.0, INIT_STD)

    def sums(self, pooled: torch.Tensor, hidden: torch.Tensor) -> dict[str, torch.Tensor | int]:
        """pooled [B, D], hidden [B, H] -> losses.hidden_state_sums of the probe's prediction."""
        return hidden_state_sums(self.proj(pooled), (hidden - self.mean) / self.std)
