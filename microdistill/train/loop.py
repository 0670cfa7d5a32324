"""The training loop: the student learns the teacher's per-step distributions first, then its exact tokens.

    microdistill train --data runs/demo/shards --out runs/demo/student --preset micro

Per output position the loss is `w_div(t)·T²·D(p_teacher^T ‖ p_student^T) + (1 - w_div(t))·CE`,
with w_div following a curriculum over all steps (cosine 0.9 -> 0.1 by default); text-only
shards train with CE alone (sequence-level distillation). The input embeddings start from the
teacher's vectors of the input tokens (see store.py), projected to the student's width by PCA,
when the shards hold them (`embed_init`). When the shards also hold the teacher's hidden state
of each input (extract's `--hidden-layer`), `hidden_weight · MSE` pulls the student's averaged
input representation, through a linear probe, onto that state (standardised per dimension):
hidden-state distillation, a far richer signal per example than a few output distributions,
which matters most when examples are few.

AdamW, cosine learning rate after a linear warm-up, gradient clipping. Every epoch: a held-out
evaluation and a checkpoint. SIGINT or SIGTERM finishes the current batch, saves a checkpoint
(with the position inside the epoch) and stops; `resume=True` continues to bit-identical weights.

`out_dir` becomes the student folder (see students/saved.py) with `checkpoint/`, `metrics.jsonl`
and `training.json` beside the model, so `predict --student DIR` takes the `--out DIR` of training.
"""

from __future__ import annotations

import math
import signal
import threading
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from microdistill.files import atomic_write_json
from microdistill.losses import curriculum_weight
from microdistill.store import ShardSet
from microdistill.task import EnumField
from microdistill.students.decoder import count_parameters
from microdistill.train.checkpoint import has_run, load_checkpoint, save_checkpoint, shard_fingerprint
from microdistill.train.config import TrainConfig, TrainError, TrainingInterrupted
from microdistill.train.decoder import forward_loss, set_up_decoder
from microdistill.train.heads import set_up_heads
from microdistill.train.log import MetricsLog, Progress, Silent
from microdistill.train.probe import HiddenProbe
from microdistill.train.setup import Setup


# ---- schedule and optimiser ----------------------------------------------------------------------
def lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    """Linear warm-up to cfg.lr over warmup_frac of the steps, then cosine down to lr·min_lr_ratio."""
    warm = int(cfg.warmup_frac * total)
    if step < warm:
        return cfg.lr * (step + 1) / warm
    p = (step - warm) / max(total - warm, 1)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * p))


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """The batches of one epoch: a permutation that depends only on (seed, epoch), so a resumed
    run regenerates exactly the order it was in."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(n, generator=g).tolist()
    return [order[i:i + batch_size] for i in range(0, n, batch_size)]


def train_step(model: nn.Module, opt: torch.optim.Optimizer, b: Any, cfg: TrainConfig, step: int, total: int,
               use_logits: bool, probe: HiddenProbe | None = None, loss: Callable = forward_loss) -> dict[str, Any]:
    """One optimiser step at `step` of `total`: schedule, forward, backward, clipping, update.
    `loss` is the student kind's loss per batch (the decoder's by default). Returns the step's
    metrics row (without step/epoch/ms)."""
    frac = step / total
    w_div = curriculum_weight(cfg.curriculum, frac, cfg.divergence_start, cfg.divergence_end) if use_logits else 0.0
    lr = lr_at(step, total, cfg)
    for group in opt.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
    parts, acc = loss(model, b, cfg, w_div, frac, probe)
    opt.zero_grad(set_to_none=True)
    parts["loss"].backward()
    if cfg.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_([p for group in opt.param_groups for p in group["params"]], cfg.grad_clip)
    opt.step()
    n = max(parts["n"], 1)
    row = {"loss": parts["loss"].item(), "divergence": parts["divergence_sum"].item() / n,
           "ce": parts["ce_sum"].item() / n, "acc": acc.item(), "lr": lr, "w_div": w_div}
    if "hidden_sum" in parts:
        row["hidden"] = (parts["hidden_sum"] / parts["hidden_n"]).item()
    return row


class StopRequest:
    """SIGINT/SIGTERM set `requested`; the loop checks it between batches. A second SIGINT
    interrupts at once (for a run that hangs)."""

    def __enter__(self) -> StopRequest:
        self.requested, self.previous = False, {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


# ---- setting up ---------------------------------------------------------------------------------
def set_up(data_dir: Path, cfg: TrainConfig, progress: bool) -> Setup:
    """Read the shards, check them against the options, build the student of `cfg.student`."""
    shards = ShardSet(data_dir)
    if len(shards) == 0:
        raise TrainError(f"shard folder {shards.dir}: holds no examples yet; run extract first")
    use_logits = {"auto": shards.has_logits, "logits": True, "text": False}[cfg.signal]
    if use_logits and not shards.has_logits:
        raise TrainError(f"shard folder {shards.dir}: text-only shards have no teacher logits; use --signal text or auto")
    if student_kind(cfg, shards) == "heads":
        return set_up_heads(shards, cfg, use_logits, progress)
    return set_up_decoder(shards, cfg, use_logits, progress)


def student_kind(cfg: TrainConfig, shards: ShardSet) -> str:
    """The kind `cfg.student` asks for; "auto" is heads when every field is an enum."""
    if cfg.student != "auto":
        return cfg.student
    return "heads" if all(isinstance(f, EnumField) for f in shards.task().output.fields) else "decoder"


# ---- the loop ----------------------------------------------------------------------------------
def train(data_dir: Path, out_dir: Path, config: TrainConfig | None = None, resume: bool = False,
          progress: bool = True, on_step: Callable[[int], None] | None = None) -> Path:
    """Train a student on the shards in `data_dir`; returns `out_dir`, the student folder.

    on_step(step) is called after every optimiser step (progress reporting, tests).
    Raises TrainingInterrupted (a KeyboardInterrupt) after saving a checkpoint on SIGINT/SIGTERM.
    """
    started = time.perf_counter()
    cfg = config or TrainConfig()
    out = Path(out_dir)
    run = set_up(data_dir, cfg, progress)
    model, opt, probe, total, train_set = run.model, run.opt, run.probe, run.total, run.train_set
    fingerprint = shard_fingerprint(run.shards, len(train_set))
    state = {"epoch": 0, "batch": 0, "step": 0, "tokens": 0, "train_s": 0.0, "wall_s": 0.0}
    if resume:
        state = load_checkpoint(out, model, opt, cfg, fingerprint, probe)
    elif has_run(out):
        raise TrainError(f"{out} already holds a training run; pass --resume to continue it, or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    log = MetricsLog(out, keep_until=state["step"])
    bar = Progress(total, state["step"], run.title, cfg.divergence) if progress else Silent()
    wall_before = state["wall_s"]

    def checkpoint() -> None:
        state["wall_s"] = wall_before + time.perf_counter() - started
        save_checkpoint(out, model, opt, cfg, fingerprint, state, probe)

    model.train()
    with StopRequest() as stop, bar, log:
        while state["step"] < total:
            batches = epoch_batches(len(train_set), cfg.batch_size, cfg.seed, state["epoch"])
            while state["batch"] < len(batches) and state["step"] < total:
                t0 = time.perf_counter()
                b = run.collate([train_set[i] for i in batches[state["batch"]]])
                row = train_step(model, opt, b, cfg, state["step"], total, run.use_logits, probe, run.loss)
                ms = (time.perf_counter() - t0) * 1e3
                state["step"] += 1
                state["batch"] += 1
                state["tokens"] += b.n_tokens
                state["train_s"] += ms / 1e3
                row = {"step": state["step"], "epoch": state["epoch"], **row, "ms": ms}
                log.write(row)
                bar.step(row)
                if on_step is not None:
                    on_step(state["step"])
                if stop.requested and state["batch"] < len(batches) and state["step"] < total:
                    checkpoint()
                    raise TrainingInterrupted(f"interrupted at step {state['step']}/{total}; checkpoint saved in "
                                              f"{out / 'checkpoint'}; run again with --resume to continue")
            # End of an epoch, or of the step budget: evaluate, then checkpoint.
            metrics = run.evaluate()
            log.write({"step": state["step"], "epoch": state["epoch"], "eval": True, **metrics})
            bar.epoch(state["epoch"], metrics)
            state["epoch"] += 1
            state["batch"] = 0
            checkpoint()
            if stop.requested and state["step"] < total:
                raise TrainingInterrupted(f"interrupted after {state['epoch']} epoch(s) (step {state['step']}/{total}); "
                                          f"checkpoint saved in {out / 'checkpoint'}; run again with --resume to continue")
    state["wall_s"] = wall_before + time.perf_counter() - started
    run.save(out)
    atomic_write_json(out / "training.json", {
        "wall_s": round(state["wall_s"], 3), "train_s": round(state["train_s"], 3), "steps": state["step"],
        "epochs": state["epoch"], "tokens": state["tokens"], "tokens_per_s": round(state["tokens"] / max(state["train_s"], 1e-9), 1),
        "examples": len(train_set), "parameters": count_parameters(model), "student": student_kind(cfg, run.shards),
        "signal": "logits" if run.use_logits else "text", "config": cfg.to_dict(),
        **run.info,
    })
    return out
