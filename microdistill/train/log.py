"""What a training run tells: metrics.jsonl for files and plots, a live line for people.

Each step's row: step, epoch, loss, divergence (the active divergence's mean per token; `kl`
in runs written before the rename), ce, acc, lr, w_div (the divergence's weight), ms, and
hidden (the hidden-state term) when on. Each epoch's held-out row has `eval: true`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from microdistill.core.console import console
from microdistill.core.files import atomic_write_bytes


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
    """The live line (rich): loss, divergence, CE, token accuracy, lr, the divergence's weight and ms per batch."""

    def __init__(self, total: int, done: int, title: str, divergence: str):
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
        from rich.progress import Progress as Rich

        self.title, self.divergence = title, divergence
        self.rich = Rich(TextColumn("train"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                         TextColumn("{task.fields[info]}"), console=console())
        self.task = self.rich.add_task("train", total=total, completed=done, info="")

    def __enter__(self) -> Progress:
        self.rich.start()
        self.rich.console.print(self.title)
        return self

    def step(self, r: dict[str, Any]) -> None:
        info = (f"loss {r['loss']:.4f} {self.divergence} {r['divergence']:.4f} ce {r['ce']:.4f} acc {r['acc']:.3f} "
                f"lr {r['lr']:.2e} w {r['w_div']:.2f} {r['ms']:.0f} ms/batch")
        self.rich.update(self.task, completed=r["step"], info=info)

    def epoch(self, epoch: int, m: dict[str, Any]) -> None:
        if m.get("val_examples"):
            self.rich.console.print(f"epoch {epoch}: val token acc {m['val_token_acc']:.4f}, "
                                    f"exact match {m['val_exact_match']:.4f} ({m['val_examples']} held out)")

    def __exit__(self, *exc) -> None:
        self.rich.stop()


class Silent:
    """Progress that shows nothing and a log that keeps nothing (progress=False, or a rank other
    than 0), so the loop never asks whether to show or write."""

    def __enter__(self) -> Silent:
        return self

    def write(self, row: dict[str, Any]) -> None:
        pass

    def step(self, r: dict[str, Any]) -> None:
        pass

    def epoch(self, epoch: int, m: dict[str, Any]) -> None:
        pass

    def __exit__(self, *exc) -> None:
        pass
