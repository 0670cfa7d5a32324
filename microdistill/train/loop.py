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
import os
import shutil
import signal
import threading
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable

import torch

from microdistill.core.files import atomic_write_json, writer_lock
from microdistill.train.losses import curriculum_weight, total_loss
from microdistill.data.shards import ShardSet
from microdistill.students import kind_for
from microdistill.students.kind import compute_parameters, count_parameters
from microdistill.train.checkpoint import has_run, load_checkpoint, save_checkpoint, shard_fingerprint
from microdistill.train.config import CHECKPOINT_EVERY, TrainConfig, TrainError, TrainingInterrupted
from microdistill.train.distributed import Ranks, start
from microdistill.train.kinds import SETUPS
from microdistill.train.log import MetricsLog, Progress, Silent
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


def train_step(ranks: Ranks, opt: torch.optim.Optimizer, b: Any, cfg: TrainConfig, step: int, total: int,
               use_logits: bool, weight: float = 1.0) -> tuple[dict[str, Any], int]:
    """One optimiser step at `step` of `total`: schedule, forward (the student kind's loss, through
    `ranks.wrap`), backward, clipping, update. `weight` 0 makes this rank's examples count for
    nothing (see Ranks.my_slice). Returns the step's metrics row (without step/epoch/ms) over the
    whole batch, all ranks together, and the number of sequence positions it held."""
    frac = step / total
    w_div = curriculum_weight(cfg.curriculum, frac, cfg.divergence_start, cfg.divergence_end) if use_logits else 0.0
    lr = lr_at(step, total, cfg)
    for group in opt.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
    loss, s = ranks.step(b, cfg, w_div, frac, weight)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if cfg.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_([p for group in opt.param_groups for p in group["params"]], cfg.grad_clip)
    opt.step()
    n = max(s["n"], 1)
    row = {"loss": float(total_loss(s, w_div, cfg.hidden_weight)), "divergence": s["divergence_sum"] / n,
           "ce": s["ce_sum"] / n, "acc": s["correct"] / n, "lr": lr, "w_div": w_div}
    if "hidden_sum" in s:
        row["hidden"] = s["hidden_sum"] / s["hidden_n"]
    return row, int(s["tokens"])


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
    return SETUPS[kind_for(cfg.student, shards.task())](shards, cfg, use_logits, progress)


# ---- the loop ----------------------------------------------------------------------------------
def every(spec: str | None) -> Callable[[int], bool]:
    """step -> whether a checkpoint is due: every N steps ("N"), every N seconds ("Ns"), or never (None)."""
    if spec is None:
        return lambda step: False
    text = str(spec).strip()
    try:
        n = float(text[:-1]) if text.endswith("s") else int(text)
    except ValueError:
        n = 0
    if n <= 0:
        raise TrainError(f"--checkpoint-every {spec!r}: expected a number of steps (500) or of seconds (300s)")
    if not text.endswith("s"):
        return lambda step: step % n == 0
    last = [time.monotonic()]

    def by_time(step: int) -> bool:
        if time.monotonic() - last[0] < n:
            return False
        last[0] = time.monotonic()
        return True

    return by_time
def train(data_dir: Path, out_dir: Path, config: TrainConfig | None = None, resume: bool = False,
          progress: bool = True, on_step: Callable[[int], None] | None = None,
          checkpoint_every: str | None = CHECKPOINT_EVERY, keep_checkpoint: bool = False) -> Path:
    """Train a student on the shards in `data_dir`; returns `out_dir`, the student folder.

    Under torchrun, each process is one rank of a DistributedDataParallel run (distributed.py).
    on_step(step) is called after every optimiser step (progress reporting, tests).
    checkpoint_every: besides each epoch's end, a checkpoint every "N" steps or "Ns" seconds
    (None: at epochs' ends only), so a killed run loses at most that much.
    keep_checkpoint: keep the last checkpoint (weights, optimiser state, probe: about 3x the
    student) once the student folder is complete; by default it is deleted, as nothing resumes it.
    Raises TrainingInterrupted (a KeyboardInterrupt) after saving a checkpoint on SIGINT/SIGTERM.
    """
    check_out(Path(data_dir), Path(out_dir), resume)
    due = every(checkpoint_every)
    # one writer per student folder: rank 0 writes it under torchrun, the other ranks never do
    lock = writer_lock(out_dir, "student folder", TrainError) if os.environ.get("RANK", "0") == "0" else nullcontext()
    with lock:
        ranks = start()
        try:
            out = _train(ranks, Path(data_dir), Path(out_dir), config or TrainConfig(), resume, progress, on_step, due)
        finally:
            ranks.close()
        if not keep_checkpoint and ranks.main:
            # training.json is written: the folder is a finished student, which no --resume continues
            for name in ("checkpoint", ".checkpoint.old"):
                shutil.rmtree(out / name, ignore_errors=True)
        return out


def check_out(data_dir: Path, out: Path, resume: bool) -> None:
    """Refuse, before anything is loaded or written, an --out that is a file, the shard folder (or
    holds it), a folder of other files, or a finished or started run without --resume."""
    if out.exists() and not out.is_dir():
        raise TrainError(f"--out {out}: is a file; give a folder for the student")
    data = data_dir.resolve()
    if out.resolve() == data or out.resolve() in data.parents:
        raise TrainError(f"--out {out}: {'is' if out.resolve() == data else 'holds'} the shard folder this reads "
                         f"({data_dir}); choose another --out")
    names = {p.name for p in out.iterdir()} if out.is_dir() else set()
    if names - {".lock"} and not (has_run(out) or "metrics.jsonl" in names):
        raise TrainError(f"--out {out}: holds other files and no training run; choose a new or empty folder")
    finished = "training.json" in names and not names & {"checkpoint", ".checkpoint.old"}
    if finished:
        raise TrainError(f"--out {out}: holds a finished student; choose another --out to train a new one")
    if has_run(out) and not resume:
        raise TrainError(f"{out} already holds a training run; pass --resume to continue it, or choose another --out")


def _train(ranks: Ranks, data_dir: Path, out: Path, cfg: TrainConfig, resume: bool, progress: bool,
           on_step: Callable[[int], None] | None, due: Callable[[int], bool]) -> Path:
    # The training loop, one function on purpose: step, log, stop, evaluate and checkpoint read
    # top to bottom in the order they happen, as an exact resume depends on.
    started = time.perf_counter()
    ranks.same_options({**cfg.to_dict(), "data": str(data_dir), "out": str(out), "resume": resume})
    run = set_up(data_dir, cfg, progress and ranks.main)
    model, opt, probe, total, train_set = run.model, run.opt, run.probe, run.total, run.train_set
    fingerprint = shard_fingerprint(run.shards, len(train_set))
    ranks.wrap(model, probe, run.loss)  # on its device first: a resumed optimiser's state follows the weights
    state = {"epoch": 0, "batch": 0, "step": 0, "tokens": 0, "train_s": 0.0, "wall_s": 0.0}
    if resume:
        state = load_checkpoint(out, model, opt, cfg, fingerprint, probe)
    elif has_run(out):
        raise TrainError(f"{out} already holds a training run; pass --resume to continue it, or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    log = MetricsLog(out, keep_until=state["step"]) if ranks.main else Silent()
    bar = Progress(total, state["step"], run.title, cfg.divergence) if progress and ranks.main else Silent()
    wall_before = state["wall_s"]

    def checkpoint() -> None:
        state["wall_s"] = wall_before + time.perf_counter() - started
        if ranks.main:
            save_checkpoint(out, model, opt, cfg, fingerprint, state, probe)

    model.train()
    with StopRequest() as stop, bar, log:
        while state["step"] < total:
            batches = epoch_batches(len(train_set), cfg.batch_size, cfg.seed, state["epoch"])
            while state["batch"] < len(batches) and state["step"] < total:
                t0 = time.perf_counter()
                mine, weight = ranks.my_slice(batches[state["batch"]])
                b = ranks.to_device(run.collate([train_set[i] for i in mine]))
                row, tokens = train_step(ranks, opt, b, cfg, state["step"], total, run.use_logits, weight)
                ms = (time.perf_counter() - t0) * 1e3
                state["step"] += 1
                state["batch"] += 1
                state["tokens"] += tokens
                state["train_s"] += ms / 1e3
                row = {"step": state["step"], "epoch": state["epoch"], **row, "ms": ms}
                log.write(row)
                bar.step(row)
                if on_step is not None:
                    on_step(state["step"])
                if due(state["step"]) and state["batch"] < len(batches) and state["step"] < total:
                    checkpoint()  # the epoch's end checkpoints anyway
                # every rank stops at the same step, whichever got the signal
                if ranks.any(stop.requested) and state["batch"] < len(batches) and state["step"] < total:
                    checkpoint()
                    raise TrainingInterrupted(f"interrupted at step {state['step']}/{total}; checkpoint saved in "
                                              f"{out / 'checkpoint'}; run again with --resume to continue")
            # End of an epoch, or of the step budget: evaluate, then checkpoint.
            if ranks.main:
                metrics = ranks.on_cpu(model, run.evaluate)
                log.write({"step": state["step"], "epoch": state["epoch"], "eval": True, **metrics})
                bar.epoch(state["epoch"], metrics)
            state["epoch"] += 1
            state["batch"] = 0
            checkpoint()
            if ranks.any(stop.requested) and state["step"] < total:
                raise TrainingInterrupted(f"interrupted after {state['epoch']} epoch(s) (step {state['step']}/{total}); "
                                          f"checkpoint saved in {out / 'checkpoint'}; run again with --resume to continue")
    state["wall_s"] = wall_before + time.perf_counter() - started
    if ranks.main:
        ranks.on_cpu(model, lambda: run.save(out))
        write_summary(out, run, cfg, state, ranks.world)
    ranks.barrier()  # every rank returns once the student folder is complete
    return out


def write_summary(out: Path, run: Setup, cfg: TrainConfig, state: dict[str, Any], processes: int) -> None:
    """training.json: how long it took, how much it saw, what it was."""
    atomic_write_json(out / "training.json", {
        "wall_s": round(state["wall_s"], 3), "train_s": round(state["train_s"], 3), "steps": state["step"],
        "epochs": state["epoch"], "tokens": state["tokens"],
        "tokens_per_s": round(state["tokens"] / max(state["train_s"], 1e-9), 1), "examples": len(run.train_set),
        "parameters": count_parameters(run.model), "compute_parameters": compute_parameters(run.model),
        "student": kind_for(cfg.student, run.shards.task()), "signal": "logits" if run.use_logits else "text",
        "config": cfg.to_dict(), "processes": processes, **run.info,
    })
