"""Training on several processes (DistributedDataParallel) and on a GPU; one process on the CPU is the default.

    torchrun --nproc-per-node 2 -m microdistill train --data shards/ --out student/ --batch-size 32

Every rank builds the same student from the same seed and walks the same epoch order; each
takes its slice of every global batch (`--batch-size` examples over all ranks together), so
the data order is one process's. A rank's loss is its sums over the *global* counts, times the
number of ranks: DDP averages gradients over ranks, so the gradient is the one-process gradient
of the whole batch, and the sums all-reduced give the one-process loss for the log. Rank 0
alone writes metrics, checkpoints and the student folder. Collectives use gloo on the CPU and
nccl on GPUs; on a GPU the forward pass runs under bfloat16 autocast.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
from typing import Any, Callable

import torch
from torch import nn

from microdistill.train.losses import total_loss
from microdistill.train.config import TrainConfig, TrainError


class Objective(nn.Module):
    """The student and its hidden-state probe behind one forward that returns the loss's parts,
    so DDP sees every parameter the loss uses, whichever method of the student computes it."""

    def __init__(self, model: nn.Module, probe: nn.Module | None, loss: Callable):
        super().__init__()
        self.model, self.probe, self.loss = model, probe, loss

    def forward(self, b: Any, cfg: TrainConfig, w_div: float, frac: float) -> tuple[dict, torch.Tensor]:
        return self.loss(self.model, b, cfg, w_div, frac, self.probe)


class Ranks:
    """This process's place among the ranks (rank 0 of 1 without torchrun) and its device."""

    def __init__(self, rank: int = 0, world: int = 1, device: torch.device | None = None):
        self.rank, self.world = rank, world
        self.device = device or torch.device("cpu")
        self.objective: nn.Module | None = None

    @property
    def main(self) -> bool:
        return self.rank == 0

    def wrap(self, model: nn.Module, probe: nn.Module | None, loss: Callable) -> None:
        """Move the student (and probe) to this rank's device; under torchrun, wrap both in DDP."""
        model.to(self.device)
        if probe is not None:
            probe.to(self.device)
        self.objective = Objective(model, probe, loss)
        if self.world > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.objective = nn.parallel.DistributedDataParallel(self.objective, device_ids=ids)

    def my_slice(self, batch: list[int]) -> tuple[list[int], float]:
        """This rank's contiguous share of a global batch, and its weight: a rank left without
        examples (a last batch smaller than the world) runs the first one at weight 0, because
        every rank must take part in every gradient all-reduce."""
        mine = batch[self.rank * len(batch) // self.world:(self.rank + 1) * len(batch) // self.world]
        return (mine, 1.0) if mine else (batch[:1], 0.0)

    def to_device(self, b: Any) -> Any:
        """A batch dataclass with its tensors (and lists of tensors) on this rank's device."""
        if self.device.type == "cpu":
            return b
        move = lambda v: v.to(self.device, non_blocking=True) if isinstance(v, torch.Tensor) else (  # noqa: E731
            [move(x) for x in v] if isinstance(v, list) else v)
        return dataclasses.replace(b, **{f.name: move(getattr(b, f.name)) for f in dataclasses.fields(b)})

    def on_cpu(self, model: nn.Module, fn: Callable[[], Any]) -> Any:
        """fn() with the student on the CPU: held-out generation (predict.py) and saving build
        CPU tensors, so a GPU run moves the student there for them and back."""
        if self.device.type == "cpu":
            return fn()
        model.cpu()
        try:
            return fn()
        finally:
            model.to(self.device)

    def autocast(self) -> contextlib.AbstractContextManager:
        """bfloat16 autocast on a GPU (matmuls in bfloat16, reductions in float32); nothing on the CPU."""
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def total(self, values: list[float]) -> list[float]:
        """Element-wise sums over the ranks (float64, so counts stay exact)."""
        if self.world == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(t)
        return t.tolist()

    def any(self, flag: bool) -> bool:
        """Whether any rank says so: a stop request must stop every rank at the same step."""
        return bool(self.total([float(flag)])[0]) if self.world > 1 else flag

    def same_options(self, options: dict[str, Any]) -> None:
        """Refuse ranks started with different options (each would train another model)."""
        if self.world == 1:
            return
        mine = hashlib.sha256(json.dumps(options, sort_keys=True, default=str).encode()).hexdigest()
        every: list[Any] = [None] * self.world
        torch.distributed.all_gather_object(every, (mine, options))
        for r, (digest, theirs) in enumerate(every):
            if digest != every[0][0]:
                diff = [f"{k}={theirs.get(k)!r} (rank 0: {v!r})" for k, v in every[0][1].items() if theirs.get(k) != v]
                raise TrainError(f"rank {r} was started with other options than rank 0 ({', '.join(diff)}); "
                                 "give every rank the same command")

    def step(self, b: Any, cfg: TrainConfig, w_div: float, frac: float, weight: float = 1.0) -> tuple[torch.Tensor, dict]:
        """Forward this rank's part of a batch -> (the loss to backpropagate, the global batch's
        {divergence_sum, ce_sum, n, correct, tokens, hidden_sum, hidden_n} summed over ranks)."""
        with self.autocast():
            parts, acc = self.objective(b, cfg, w_div, frac)
        hidden = "hidden_sum" in parts
        local = [parts["n"] * weight, parts["hidden_n"] * weight if hidden else 0.0]
        n, hidden_n = self.total(local) if self.world > 1 else (parts["n"], parts.get("hidden_n", 0))
        keys = ["divergence_sum", "ce_sum"] + (["hidden_sum"] if hidden else [])
        sums = {k: parts[k] * weight if weight != 1.0 else parts[k] for k in keys}
        loss = total_loss({**parts, **sums, "n": n, "hidden_n": hidden_n}, w_div, cfg.hidden_weight)
        if self.world > 1:
            loss = loss * self.world  # DDP divides the summed gradients by the number of ranks
        values = [float(sums[k].detach()) for k in keys] + [float(acc) * parts["n"] * weight, b.n_tokens * weight]
        summed = self.total(values)
        out = dict(zip(keys + ["correct", "tokens"], summed), n=n, hidden_n=hidden_n, teacher=parts.get("teacher", True))
        return loss, out

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    def close(self) -> None:
        if self.world > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def start() -> Ranks:
    """This process's Ranks: from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK) when it
    starts more than one process, else one rank; on the GPU when there is one."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world == 1:
        return Ranks(0, 1, device)
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if cuda else "gloo")
    return Ranks(torch.distributed.get_rank(), world, device)
