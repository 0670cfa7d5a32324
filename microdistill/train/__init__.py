"""Training: shards in, a student folder out.

    config.py      TrainConfig, the options that decide the weights
    loop.py        train(): set up, then one readable loop over train_step()
    checkpoint.py  exact resume: weights, optimiser, RNG states, data position
    log.py         metrics.jsonl and the live progress line
    distributed.py torchrun ranks (DDP) and the device: each rank a slice of the global batch
    probe.py       the hidden-state probe (kept in checkpoints, never in the student folder)
    runs.py        train unless done; accuracy against the number of examples
"""

from microdistill.train.config import TrainConfig, TrainError, TrainingInterrupted
from microdistill.train.loop import train, train_step
from microdistill.train.runs import held_out_exact, train_once, train_sizes

__all__ = ["TrainConfig", "TrainError", "TrainingInterrupted", "held_out_exact", "train", "train_once", "train_sizes",
           "train_step"]
