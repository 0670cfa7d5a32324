"""Training: the student learns the teacher's per-step distributions first, then its exact tokens.

    microdistill train --data runs/demo/shards --out runs/demo/student --preset micro

Per output position the loss is `w_kl(t)·T²·D(p_teacher^T ‖ p_student^T) + (1 - w_kl(t))·CE`,
with w_kl following a curriculum over all steps (cosine 0.9 -> 0.1 by default); text-only
shards train with CE alone (sequence-level distillation). The input embeddings start from the
teacher's vectors of the input tokens (see store.py), projected to the student's width by PCA,
when the shards hold them (`embed_init`).
When the shards also hold the teacher's hidden state of each input (extract's `--hidden-layer`),
`hidden_weight · MSE` pulls the student's averaged input representation, through a linear probe,
onto that state (standardised per dimension): hidden-state distillation, a far richer signal per
example than a few output distributions, which matters most when examples are few.
AdamW, cosine learning rate after a linear warm-up, gradient clipping. Every epoch: a held-out evaluation and a checkpoint. SIGINT
or SIGTERM finishes the current batch, saves a checkpoint (with the position inside the epoch)
and stops; `resume=True` continues to bit-identical weights.

`out_dir` becomes the student folder (see saved.py) with `checkpoint/`, `metrics.jsonl` and
`training.json` beside the model, so `predict --student DIR` takes the `--out DIR` of training.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
import signal
import threading
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from microdistill.losses import CURRICULA, DIVERGENCES, curriculum_weight, distill_loss, taid_lambda, with_tail
from microdistill.predict import generate, parse_or_none
from microdistill.saved import LoadedStudent, save_student
from microdistill.store import Record, ShardSet, StoreError, atomic_write_bytes, atomic_write_json
from microdistill.student import (INIT_STD, N_SPECIAL, PRESETS, Student, config_for, count_parameters, describe,
                                  init_input_embeddings_pca)

EMBED_INITS = ("teacher", "random")


class TrainError(StoreError):
    """A training option, shard folder or checkpoint that cannot be used; one line for the user.

    A StoreError, so every command reports it as `error: ...` without the CLI importing torch."""


class TrainingInterrupted(KeyboardInterrupt):
    """Training stopped on SIGINT/SIGTERM after saving a checkpoint; the message says how to resume."""


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides the trained weights (eval_limit aside); stored in every checkpoint."""

    preset: str = "micro"  # student size: nano, micro, small, seed
    epochs: int = 10
    batch_size: int = 32
    lr: float = 2e-3  # peak; tiny models tolerate (and need) more than LLM-scale rates
    min_lr_ratio: float = 0.1  # the cosine ends at lr * min_lr_ratio
    warmup_frac: float = 0.05  # fraction of all steps with a linear warm-up
    weight_decay: float = 0.1  # on matrices and embeddings, not on norm gains
    grad_clip: float = 1.0  # max global gradient norm; 0 disables
    dropout: float = 0.0  # on the student's residual branches while training (its `dropout`)
    seed: int = 0
    divergence: str = "forward_kl"  # see losses.DIVERGENCES
    temperature: float = 1.0
    beta: float = 0.5  # jsd
    alpha: float = 0.1  # skew_kl
    curriculum: str = "cosine"  # w_kl schedule, see losses.CURRICULA
    kl_start: float = 0.9
    kl_end: float = 0.1
    tail: bool = False  # one extra output class for the teacher's mass outside the kept set
    signal: str = "auto"  # "logits", "text" (CE only), or "auto": logits when the shards have them
    # "teacher": input embeddings start from the teacher's vectors (PCA to d_model) when the shards hold
    # them, else random; "random": N(0, 0.02) like every other weight
    embed_init: str = "teacher"
    # Weight of the hidden-state loss when the shards hold the teacher's input hidden states and
    # teacher logits are used (text-only training has no teacher internals); 0 turns it off.
    hidden_weight: float = 1.0
    max_steps: int | None = None  # a fixed step budget instead of `epochs` (the last epoch may be partial)
    limit_train: int | None = None  # use only the first N training examples
    eval_limit: int | None = None  # evaluate on at most N held-out examples

    def __post_init__(self) -> None:
        def need(ok: bool, name: str, what: str) -> None:
            if not ok:
                raise TrainError(f"training option {name}={getattr(self, name)!r}: {what}")

        need(self.preset in PRESETS, "preset", f"choose one of {', '.join(PRESETS)}")
        need(self.divergence in DIVERGENCES, "divergence", f"choose one of {', '.join(DIVERGENCES)}")
        need(self.curriculum in CURRICULA, "curriculum", f"choose one of {', '.join(CURRICULA)}")
        need(self.signal in ("auto", "logits", "text"), "signal", "choose auto, logits or text")
        need(self.embed_init in EMBED_INITS, "embed_init", f"choose {' or '.join(EMBED_INITS)}")
        for name in ("epochs", "batch_size"):
            need(isinstance(getattr(self, name), int) and getattr(self, name) >= 1, name, "must be a positive integer")
        for name in ("max_steps", "limit_train", "eval_limit"):
            v = getattr(self, name)
            need(v is None or (isinstance(v, int) and v >= 1), name, "must be a positive integer or unset")
        need(0 < self.lr < 1, "lr", "must be in (0, 1)")
        for name in ("min_lr_ratio", "kl_start", "kl_end", "beta"):
            need(0.0 <= getattr(self, name) <= 1.0, name, "must be in [0, 1]")
        need(0.0 <= self.warmup_frac < 1.0, "warmup_frac", "must be in [0, 1)")
        need(0.0 <= self.alpha < 1.0, "alpha", "must be in [0, 1)")
        need(self.weight_decay >= 0, "weight_decay", "must not be negative")
        need(0.0 <= self.dropout < 1.0, "dropout", "must be in [0, 1)")
        need(self.grad_clip >= 0, "grad_clip", "must not be negative (0 disables clipping)")
        need(0 < self.temperature <= 100, "temperature", "must be in (0, 100]")
        need(isinstance(self.hidden_weight, (int, float)) and self.hidden_weight >= 0, "hidden_weight",
             "must not be negative (0 disables the hidden-state loss)")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


# ---- data ------------------------------------------------------------------------------------
@dataclass
class Example:
    """One training example in student indices: inp [Li] input indices, out [Lo] output indices
    ending with EOS; logits float16 [Lo, K] and lse float32 [Lo] when the shards have them;
    hidden float16 [H], the teacher's input hidden state, when hidden-state distillation is on."""

    inp: list[int]
    out: list[int]
    logits: np.ndarray | None
    lse: np.ndarray | None
    hidden: np.ndarray | None = None


@dataclass
class Batch:
    """inp [B, Li] (PAD right), out_in [B, Lo-1] (previous outputs), target [B, Lo], mask [B, Lo]
    (True at real output positions), teacher [B, Lo, K] float32 and lse [B, Lo] or None,
    hidden [B, H] float32 (the teacher's input hidden states) or None."""

    inp: torch.Tensor
    out_in: torch.Tensor
    target: torch.Tensor
    mask: torch.Tensor
    teacher: torch.Tensor | None
    lse: torch.Tensor | None
    n_kept: int
    n_tokens: int  # sequence positions through the model (BOS, input, SEP, outputs), for tokens/s
    hidden: torch.Tensor | None = None


def load_split(shards: ShardSet, split: str, use_logits: bool, limit: int | None,
               allow_empty: bool = False, use_hidden: bool = False) -> tuple[list[Example], list[Record]]:
    """The first `limit` examples of a split, mapped from teacher ids to student indices."""
    records = list(shards.records(split))[:limit]
    if not records and not allow_empty:
        raise TrainError(f"shard folder {shards.dir}: no {split} examples")
    in_index = {int(t): N_SPECIAL + p for p, t in enumerate(shards.input_vocab)}
    out_index = {int(t): k for k, t in enumerate(shards.kept_vocab)}
    examples = []
    for r in records:
        try:
            inp = [in_index[int(i)] for i in r.input_ids]
            out = [out_index[int(i)] for i in r.output_ids]
        except KeyError as e:
            raise TrainError(f"shard folder {shards.dir}: example {r.id} uses teacher token {e.args[0]} outside "
                             "the manifest's vocabulary (mixed or corrupted shards); extract again") from None
        if use_hidden and r.hidden is None:
            raise TrainError(f"shard folder {shards.dir}: example {r.id} has no teacher hidden state although the "
                             "manifest says every example has one (mixed or corrupted shards); extract again")
        examples.append(Example(inp, out, r.logits if use_logits else None, r.lse if use_logits else None,
                                r.hidden if use_hidden else None))
    return examples, records


def collate(examples: list[Example], n_kept: int) -> Batch:
    B, Li, Lo = len(examples), max(len(e.inp) for e in examples), max(len(e.out) for e in examples)
    inp = torch.zeros(B, Li, dtype=torch.long)
    out_in = torch.zeros(B, max(Lo - 1, 0), dtype=torch.long)
    target = torch.zeros(B, Lo, dtype=torch.long)
    mask = torch.zeros(B, Lo, dtype=torch.bool)
    with_logits = examples[0].logits is not None
    teacher = torch.zeros(B, Lo, n_kept) if with_logits else None
    lse = torch.zeros(B, Lo) if with_logits else None
    for i, e in enumerate(examples):
        n = len(e.out)
        inp[i, : len(e.inp)] = torch.tensor(e.inp)
        out_in[i, : n - 1] = torch.tensor(e.out[:-1])
        target[i, :n] = torch.tensor(e.out)
        mask[i, :n] = True
        if with_logits:
            teacher[i, :n] = torch.from_numpy(e.logits.astype(np.float32))
            lse[i, :n] = torch.from_numpy(e.lse)
    n_tokens = sum(len(e.inp) + 1 + len(e.out) for e in examples)
    hidden = torch.from_numpy(np.stack([e.hidden for e in examples]).astype(np.float32)) if examples[0].hidden is not None else None
    return Batch(inp, out_in, target, mask, teacher, lse, n_kept, n_tokens, hidden)


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

    def loss(self, pooled: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(self.proj(pooled), (hidden - self.mean) / self.std)


# ---- schedule and optimiser ----------------------------------------------------------------------
def lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    """Linear warm-up to cfg.lr over warmup_frac of the steps, then cosine down to lr·min_lr_ratio."""
    warm = int(cfg.warmup_frac * total)
    if step < warm:
        return cfg.lr * (step + 1) / warm
    p = (step - warm) / max(total - warm, 1)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * p))


def make_optimizer(model: Student, cfg: TrainConfig, probe: HiddenProbe | None = None) -> torch.optim.AdamW:
    # Decay matrices and embeddings only: shrinking a norm gain towards 0 fights the (1 + w) form.
    params = list(model.parameters()) + (list(probe.parameters()) if probe is not None else [])
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """The batches of one epoch: a permutation that depends only on (seed, epoch), so a resumed
    run regenerates exactly the order it was in."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(n, generator=g).tolist()
    return [order[i:i + batch_size] for i in range(0, n, batch_size)]


def batch_loss(model: Student, b: Batch, cfg: TrainConfig, w_kl: float, progress: float,
               probe: HiddenProbe | None = None) -> tuple[dict, torch.Tensor]:
    """Forward one batch -> (distill_loss parts (+ "hidden" with a probe), token accuracy as a 0-dim tensor)."""
    with_hidden = probe is not None and b.hidden is not None
    logits = model(b.inp, b.out_in, pooled=with_hidden)  # [B, Lo, K(+1)]
    if with_hidden:
        logits, pooled = logits
    K = logits.shape[-1]
    teacher = b.teacher
    if teacher is not None and cfg.tail:
        teacher = with_tail(teacher.reshape(-1, teacher.shape[-1]), b.lse.reshape(-1)).view(*b.target.shape, K)
    lam = taid_lambda(progress) if cfg.divergence == "taid" else None
    parts = distill_loss(logits, teacher, b.target, b.mask, w_kl, divergence=cfg.divergence, T=cfg.temperature,
                         beta=cfg.beta, alpha=cfg.alpha, lam=lam)
    if with_hidden:
        parts["hidden"] = probe.loss(pooled, b.hidden)
        parts["loss"] = parts["loss"] + cfg.hidden_weight * parts["hidden"]
    # The tail class is never a token to say, so accuracy ignores it.
    pred = logits[..., : b.n_kept].argmax(-1)
    acc = ((pred == b.target) & b.mask).sum() / b.mask.sum().clamp_min(1)
    return parts, acc


@torch.no_grad()
def evaluate_epoch(loaded: LoadedStudent, examples: list[Example], records: list, batch_size: int) -> dict[str, Any]:
    """Held-out metrics against the teacher: teacher-forced token accuracy, and free-running
    (greedy, constrained) exact match of the whole output and agreement per field."""
    if not examples:
        return {"val_examples": 0}
    model, was_training = loaded.model, loaded.model.training
    model.eval()
    right = total = 0
    for i in range(0, len(examples), batch_size):
        b = collate(examples[i:i + batch_size], len(loaded.kept))
        pred = model(b.inp, b.out_in)[..., : b.n_kept].argmax(-1)
        right += int(((pred == b.target) & b.mask).sum())
        total += int(b.mask.sum())
    model.train(was_training)
    outs = generate(loaded, [r.input_ids for r in records], constrain=True, batch_size=max(batch_size, 64))
    tok, task = loaded.tokenizer, loaded.task
    exact, agree = 0, {name: 0 for name in task.field_names}
    for r, out in zip(records, outs):
        text = tok.decode(out)
        exact += text == tok.decode(r.output_ids[:-1])
        fields_ = parse_or_none(task, text) or {}
        for name in agree:
            agree[name] += fields_.get(name, object()) == r.fields.get(name)
    n = len(records)
    return {"val_examples": n, "val_token_acc": right / max(total, 1), "val_exact_match": exact / n,
            "val_field_agreement": {k: v / n for k, v in agree.items()}}


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


# ---- checkpoints -------------------------------------------------------------------------------
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


def save_checkpoint(out: Path, model: Student, opt: torch.optim.Optimizer, cfg: TrainConfig,
                    fingerprint: dict, state: dict[str, Any], probe: HiddenProbe | None = None) -> None:
    """out/checkpoint/{state.pt, meta.json}, replaced as a whole: written beside it, then renamed."""
    blob = {"model": model.state_dict(), "optimizer": opt.state_dict(), "rng": rng_state(),
            "probe": probe.state_dict() if probe is not None else None,
            "scheduler": {"kind": "warmup-cosine", "step": state["step"]}, "config": cfg.to_dict(),
            "student": model.config.to_dict(), "fingerprint": fingerprint, **state}
    tmp, final, old = out / ".checkpoint.tmp", out / "checkpoint", out / ".checkpoint.old"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    torch.save(blob, tmp / "state.pt")
    atomic_write_json(tmp / "meta.json", {"config": cfg.to_dict(), "fingerprint": fingerprint, **state})
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(out: Path, model: Student, opt: torch.optim.Optimizer, cfg: TrainConfig,
                    fingerprint: dict, probe: HiddenProbe | None = None) -> dict[str, Any]:
    """Restore weights, optimiser and RNG states in place; returns the loop state."""
    path = next((p for p in (out / "checkpoint" / "state.pt", out / ".checkpoint.old" / "state.pt") if p.is_file()), None)
    if path is None:
        raise TrainError(f"{out}: no checkpoint to resume from; run without --resume")
    try:
        blob = torch.load(path, weights_only=True)
    except Exception as e:  # torch raises several types for truncated or foreign files
        raise TrainError(f"{path}: corrupted checkpoint ({type(e).__name__}); delete {path.parent} to start over") from None
    for key, value in fingerprint.items():
        if blob["fingerprint"].get(key) != value:
            raise TrainError(f"{path}: trained on shards with a different {key}; these shards cannot continue it "
                             "(use another --out)")
    # checkpoints from before these options: random input embeddings, no hidden-state loss
    saved = {"embed_init": "random", "hidden_weight": 0.0, "dropout": 0.0, **blob["config"]}
    diff = [f"{k}={saved.get(k)!r}" for k, v in cfg.to_dict().items() if k != "eval_limit" and saved.get(k) != v]
    if diff:
        raise TrainError(f"{path}: saved with other training options ({', '.join(diff)}); resume with the same options")
    model.load_state_dict(blob["model"])
    if probe is not None:
        probe.load_state_dict(blob["probe"])
    opt.load_state_dict(blob["optimizer"])
    set_rng_state(blob["rng"])
    return {k: blob[k] for k in ("epoch", "batch", "step", "tokens", "train_s", "wall_s")}


# ---- logging -----------------------------------------------------------------------------------
class MetricsLog:
    """metrics.jsonl (one object per step or evaluation), plus TensorBoard scalars when installed."""

    def __init__(self, out: Path, keep_until: int):
        self.path = out / "metrics.jsonl"
        # Rows after the checkpoint's step belong to steps the resumed run does again.
        kept = []
        if keep_until and self.path.exists():
            kept = [line for line in self.path.read_text().splitlines(keepends=True)
                    if line.strip() and json.loads(line).get("step", 0) <= keep_until]
        atomic_write_bytes(self.path, "".join(kept).encode())
        self.file = self.path.open("a")
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out / "tensorboard"))
        except ImportError:
            self.tb = None

    def write(self, row: dict[str, Any]) -> None:
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        if self.tb is not None:
            prefix = "eval" if row.get("eval") else "train"
            for k, v in row.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("step", "epoch"):
                    self.tb.add_scalar(f"{prefix}/{k}", v, row["step"])

    def __enter__(self) -> MetricsLog:
        return self

    def __exit__(self, *exc) -> None:
        self.file.close()
        if self.tb is not None:
            self.tb.close()


class Progress:
    """The live line (rich): loss, KL, CE, token accuracy, lr, w_kl and ms per batch."""

    def __init__(self, total: int, done: int, title: str):
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
        from rich.progress import Progress as Rich

        self.title = title
        self.rich = Rich(TextColumn("train"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                         TextColumn("{task.fields[info]}"))
        self.task = self.rich.add_task("train", total=total, completed=done, info="")

    def __enter__(self) -> Progress:
        self.rich.start()
        self.rich.console.print(self.title)
        return self

    def step(self, r: dict[str, Any]) -> None:
        info = (f"loss {r['loss']:.4f} kl {r['kl']:.4f} ce {r['ce']:.4f} acc {r['acc']:.3f} "
                f"lr {r['lr']:.2e} w_kl {r['w_kl']:.2f} {r['ms']:.0f} ms/batch")
        self.rich.update(self.task, completed=r["step"], info=info)

    def epoch(self, epoch: int, m: dict[str, Any]) -> None:
        if m.get("val_examples"):
            self.rich.console.print(f"epoch {epoch}: val token acc {m['val_token_acc']:.4f}, "
                                    f"exact match {m['val_exact_match']:.4f} ({m['val_examples']} held out)")

    def __exit__(self, *exc) -> None:
        self.rich.stop()


class Silent:
    """Progress that shows nothing (progress=False)."""

    def __enter__(self) -> Silent:
        return self

    def step(self, r: dict[str, Any]) -> None:
        pass

    def epoch(self, epoch: int, m: dict[str, Any]) -> None:
        pass

    def __exit__(self, *exc) -> None:
        pass


# ---- the loop ----------------------------------------------------------------------------------
def init_embeddings(model: Student, shards: ShardSet, cfg: TrainConfig, progress: bool) -> str:
    """Start the input embeddings from the teacher's rows when asked and the shards hold them;
    returns the initialisation used ("teacher" or "random")."""
    if cfg.embed_init != "teacher":
        return "random"
    rows = shards.input_embeddings()
    if rows is None:
        if progress:
            from rich.console import Console

            Console(stderr=True, highlight=False).print(
                f"note: {shards.dir} holds no teacher input embeddings (text-only or older shards); "
                "input embeddings start random")
        return "random"
    init_input_embeddings_pca(model, rows)
    return "teacher"


def train(data_dir: Path, out_dir: Path, config: TrainConfig | None = None, resume: bool = False,
          progress: bool = True, on_step: Callable[[int], None] | None = None) -> Path:
    """Train a student on the shards in `data_dir`; returns `out_dir`, the student folder.

    on_step(step) is called after every optimiser step (progress reporting, tests).
    Raises TrainingInterrupted (a KeyboardInterrupt) after saving a checkpoint on SIGINT/SIGTERM.
    """
    started = time.perf_counter()
    cfg = config or TrainConfig()
    out = Path(out_dir)
    shards = ShardSet(data_dir)
    if len(shards) == 0:
        raise TrainError(f"shard folder {shards.dir}: holds no examples yet; run extract first")
    task, tokenizer = shards.task(), shards.tokenizer()
    use_logits = {"auto": shards.has_logits, "logits": True, "text": False}[cfg.signal]
    if use_logits and not shards.has_logits:
        raise TrainError(f"shard folder {shards.dir}: text-only shards have no teacher logits; use --signal text or auto")
    if cfg.tail and not use_logits:
        raise TrainError("training option tail=True needs teacher logits; the shards (or --signal text) have none")
    use_hidden = use_logits and cfg.hidden_weight > 0 and shards.hidden_layer is not None
    train_set, _ = load_split(shards, "train", use_logits, cfg.limit_train, use_hidden=use_hidden)
    val_set, val_records = load_split(shards, "val", use_logits, cfg.eval_limit, allow_empty=True)
    kept = shards.kept_vocab
    scfg = config_for(
        cfg.preset, N_SPECIAL + len(shards.input_vocab), len(kept) + int(cfg.tail),
        max([task.inputs.max_tokens] + [len(e.inp) for e in train_set + val_set]),
        max([task.output.max_tokens] + [len(e.out) for e in train_set + val_set]), dropout=cfg.dropout,
    )
    seed_everything(cfg.seed)
    model = Student(scfg)
    embed_init = init_embeddings(model, shards, cfg, progress)  # draws no random numbers
    probe = HiddenProbe(scfg.d_model, np.stack([e.hidden for e in train_set])) if use_hidden else None
    opt = make_optimizer(model, cfg, probe)
    params = [p for group in opt.param_groups for p in group["params"]]
    per_epoch = math.ceil(len(train_set) / cfg.batch_size)
    total = cfg.max_steps or cfg.epochs * per_epoch
    fingerprint = shard_fingerprint(shards, len(train_set))
    state = {"epoch": 0, "batch": 0, "step": 0, "tokens": 0, "train_s": 0.0, "wall_s": 0.0}
    if resume:
        state = load_checkpoint(out, model, opt, cfg, fingerprint, probe)
    elif has_run(out):
        raise TrainError(f"{out} already holds a training run; pass --resume to continue it, or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    loaded = LoadedStudent.from_shards(model, shards, tokenizer)
    log = MetricsLog(out, keep_until=state["step"])
    bar = Progress(total, state["step"], describe(scfg)) if progress else Silent()
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
                b = collate([train_set[i] for i in batches[state["batch"]]], len(kept))
                frac = state["step"] / total
                w_kl = curriculum_weight(cfg.curriculum, frac, cfg.kl_start, cfg.kl_end) if use_logits else 0.0
                lr = lr_at(state["step"], total, cfg)
                for group in opt.param_groups:
                    group["lr"] = lr
                parts, acc = batch_loss(model, b, cfg, w_kl, frac, probe)
                opt.zero_grad(set_to_none=True)
                parts["loss"].backward()
                if cfg.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                opt.step()
                ms = (time.perf_counter() - t0) * 1e3
                state["step"] += 1
                state["batch"] += 1
                state["tokens"] += b.n_tokens
                state["train_s"] += ms / 1e3
                n = max(parts["n"], 1)
                row = {"step": state["step"], "epoch": state["epoch"], "loss": parts["loss"].item(),
                       "kl": parts["kl_sum"].item() / n, "ce": parts["ce_sum"].item() / n, "acc": acc.item(),
                       "lr": lr, "w_kl": w_kl, "ms": ms}
                if "hidden" in parts:
                    row["hidden"] = parts["hidden"].item()
                log.write(row)
                bar.step(row)
                if on_step is not None:
                    on_step(state["step"])
                if stop.requested and state["batch"] < len(batches) and state["step"] < total:
                    checkpoint()
                    raise TrainingInterrupted(f"interrupted at step {state['step']}/{total}; checkpoint saved in "
                                              f"{out / 'checkpoint'}; run again with --resume to continue")
            # End of an epoch, or of the step budget: evaluate, then checkpoint.
            metrics = evaluate_epoch(loaded, val_set, val_records, cfg.batch_size)
            log.write({"step": state["step"], "epoch": state["epoch"], "eval": True, **metrics})
            bar.epoch(state["epoch"], metrics)
            state["epoch"] += 1
            state["batch"] = 0
            checkpoint()
            if stop.requested and state["step"] < total:
                raise TrainingInterrupted(f"interrupted after {state['epoch']} epoch(s) (step {state['step']}/{total}); "
                                          f"checkpoint saved in {out / 'checkpoint'}; run again with --resume to continue")
    state["wall_s"] = wall_before + time.perf_counter() - started
    save_student(model, scfg, shards, out, extra={"training": cfg.to_dict(), "preset": cfg.preset})
    atomic_write_json(out / "training.json", {
        "wall_s": round(state["wall_s"], 3), "train_s": round(state["train_s"], 3), "steps": state["step"],
        "epochs": state["epoch"], "tokens": state["tokens"], "tokens_per_s": round(state["tokens"] / max(state["train_s"], 1e-9), 1),
        "examples": len(train_set), "parameters": count_parameters(model), "preset": cfg.preset,
        "signal": "logits" if use_logits else "text", "embed_init": embed_init, "config": cfg.to_dict(),
        "hidden_layer": shards.hidden_layer if use_hidden else None,
    })
    return out
