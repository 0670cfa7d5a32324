"""Training: shards in, a student folder out.

    config.py      TrainConfig, the options that decide the weights (no torch)
    losses.py      divergences, curricula and the hidden-state term: sums and counts, one division
    setup.py       what a run is made of (Setup) and the optimiser every kind shares
    kinds.py       each student kind's set-up by name: decoder.py, heads.py (data, model, loss per batch)
    loop.py        train(): set up, then one readable loop over train_step()
    checkpoint.py  exact resume: weights, optimiser, RNG states, data position
    log.py         metrics.jsonl and the live progress line
    distributed.py torchrun ranks (DDP) and the device: each rank a slice of the global batch
    probe.py       the hidden-state probe (kept in checkpoints, never in the student folder)
    runs.py        train unless done; accuracy against the number of examples
"""

from microdistill.train.config import TrainConfig, TrainError, TrainingInterrupted

__all__ = ["TrainConfig", "TrainError", "TrainingInterrupted", "held_out_exact", "train", "train_once", "train_sizes",
           "train_step"]


# The command line imports train.config to build its flags, and so this package: the names that
# need torch are imported on first use, so that `--help` imports no torch.
def _loop() -> dict:
    from microdistill.train.loop import train, train_step

    return {"train": train, "train_step": train_step}


def _runs() -> dict:
    from microdistill.train.runs import held_out_exact, train_once, train_sizes

    return {"held_out_exact": held_out_exact, "train_once": train_once, "train_sizes": train_sizes}


def __getattr__(name: str):
    for load, names in ((_loop, ("train", "train_step")), (_runs, ("held_out_exact", "train_once", "train_sizes"))):
        if name in names:
            globals().update(load())  # later lookups (and monkeypatches) find them here
            return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
