"""Training the decoder student (students/decoder.py): its setup and its loss per batch."""

from __future__ import annotations

import math

import numpy as np
import torch

from microdistill.core.console import say
from microdistill.extract.embeddings import add_input_embeddings
from microdistill.train.losses import output_sums, taid_lambda, total_loss, with_tail
from microdistill.data.shards import ShardSet
from microdistill.students.decoder.data import Batch, collate, load_split
from microdistill.students.decoder.config import N_SPECIAL, config_for, describe
from microdistill.students.decoder.model import Student, init_input_embeddings_pca
from microdistill.students.decoder.predict import held_out
from microdistill.students.decoder.folder import LoadedDecoder, save_student
from microdistill.train.config import TrainConfig, TrainError
from microdistill.train.on_policy import OnPolicy
from microdistill.train.probe import HiddenProbe
from microdistill.train.setup import Setup, make_optimizer, seed_everything


def forward_loss(model: Student, b: Batch, cfg: TrainConfig, w_div: float, progress: float,
                 probe: HiddenProbe | None = None) -> tuple[dict, torch.Tensor]:
    """Forward one batch -> (the loss's sums and "loss" (losses.total_loss), token accuracy as a 0-dim tensor)."""
    with_hidden = probe is not None and b.hidden is not None
    if with_hidden:
        logits, pooled = model.forward_pooled(b.inp, b.out_in)  # [B, Lo, K(+1)], [B, D]
    else:
        logits = model(b.inp, b.out_in)
    K = logits.shape[-1]
    teacher = b.teacher
    if teacher is not None and cfg.tail:
        teacher = with_tail(teacher.reshape(-1, teacher.shape[-1]), b.lse.reshape(-1)).view(*b.target.shape, K)
    lam = taid_lambda(progress) if cfg.divergence == "taid" else None
    parts = output_sums(logits, teacher, b.target, b.mask, divergence=cfg.divergence, T=cfg.temperature,
                        beta=cfg.beta, alpha=cfg.alpha, lam=lam)
    if with_hidden:
        parts.update(probe.sums(pooled, b.hidden))
    parts["loss"] = total_loss(parts, w_div, cfg.hidden_weight)
    # The tail class is never a token to say, so accuracy ignores it.
    pred = logits[..., : b.n_kept].argmax(-1)
    acc = ((pred == b.target) & b.mask).sum() / b.mask.sum().clamp_min(1)
    return parts, acc


def init_embeddings(model: Student, shards: ShardSet, cfg: TrainConfig, progress: bool) -> str:
    """Start the input embeddings from the teacher's rows when asked and the shards hold them;
    returns the initialisation used ("teacher" or "random")."""
    if cfg.embed_init != "teacher":
        return "random"
    rows = shards.input_embeddings()
    if rows is None and shards.has_logits and "api" not in shards.manifest:  # a local teacher's folder
        add_input_embeddings(shards, progress)
        rows = shards.input_embeddings()
    if rows is None:
        say(f"note: {shards.dir} holds no teacher input embeddings (a served teacher's shards); "
            "input embeddings start random", progress)
        return "random"
    init_input_embeddings_pca(model, rows)
    return "teacher"


def set_up_decoder(shards: ShardSet, cfg: TrainConfig, use_logits: bool, progress: bool) -> Setup:
    """The decoder student (students/decoder.py), its hidden-state probe and optimiser."""
    task = shards.task()
    if cfg.augment:
        raise TrainError("training option augment is for the heads student; the decoder learns the teacher's tokens "
                         "for each input text")
    if cfg.init_from:
        raise TrainError("training option init_from is for the heads student; a decoder run starts from its preset")
    if cfg.on_policy and not use_logits:
        raise TrainError("training option on_policy needs teacher logits to learn from; --signal text has none")
    if cfg.tail and not use_logits:
        raise TrainError("training option tail=True needs teacher logits; the shards (or --signal text) have none")
    use_hidden = use_logits and cfg.hidden_weight > 0 and shards.hidden_layer is not None
    train_set, _ = load_split(shards, "train", use_logits, cfg.limit_train, use_hidden=use_hidden)
    val_set, val_records = load_split(shards, "val", use_logits, cfg.eval_limit, allow_empty=True)
    scfg = config_for(
        cfg.preset, N_SPECIAL + len(shards.input_vocab), len(shards.kept_vocab) + int(cfg.tail),
        max([task.inputs.max_tokens] + [len(e.inp) for e in train_set + val_set]),
        max([task.output.max_tokens] + [len(e.out) for e in train_set + val_set]), dropout=cfg.dropout,
    )
    seed_everything(cfg.seed)
    model = Student(scfg)
    embed_init = init_embeddings(model, shards, cfg, progress)  # draws no random numbers
    probe = HiddenProbe(scfg.d_model, np.stack([e.hidden for e in train_set])) if use_hidden else None
    total = cfg.max_steps or cfg.epochs * math.ceil(len(train_set) / cfg.batch_size)
    loaded = LoadedDecoder.from_shards(model, shards)
    n_kept = len(shards.kept_vocab)

    def batch(examples: list) -> Batch:
        return collate(examples, n_kept)

    return Setup(
        shards, use_logits, train_set, model, probe, make_optimizer(model, cfg, probe), total,
        collate=OnPolicy(shards, cfg, loaded, batch, progress) if cfg.on_policy else batch, loss=forward_loss,
        evaluate=lambda: held_out(loaded, val_set, val_records, cfg.batch_size),
        save=lambda out: save_student(model, scfg, shards, out, extra={"training": cfg.to_dict(), "preset": cfg.preset}),
        info={"preset": cfg.preset, "embed_init": embed_init,
              "hidden_layer": shards.hidden_layer if use_hidden else None, "on_policy": cfg.on_policy},
        title=describe(scfg))
