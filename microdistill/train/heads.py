"""Training the classifier-head student (students/heads.py) with the decoder's loop.

Per field, the loss is the decoder's per token: `w_div·T²·D(p_teacher ‖ p_student) + (1 -
w_div)·CE(teacher's value)`, with p_teacher the teacher's probability of each allowed value at
the field's decision point; the fields' sums add up and `losses.total_loss` divides once. The
body (a pretrained encoder, or one cut from the teacher: students/teacher_body.py) learns at
lr·pretrained_lr_ratio, the new heads at lr. The saved folder gets its per-field temperatures
(confidence.py) fitted on the held-out split, when there is one.
"""

from __future__ import annotations

import dataclasses
import math
import random
from pathlib import Path

import torch

from microdistill.students.confidence import FOLDS, calibrate_confidence
from microdistill.core.console import say
from microdistill.data.edits import augment
from microdistill.train.losses import output_sums, taid_lambda, total_loss
from microdistill.data.shards import ShardSet
from microdistill.students.kind import compute_parameters
from microdistill.students.heads.encoder import keep_layers, load_encoder, prune_embeddings, prune_vocabulary, tokenizer_from_json
from microdistill.students.heads.teacher_body import cut_teacher, is_teacher_spec
from microdistill.students.heads.fields import enum_fields
from microdistill.students.heads.folder import save_heads
from microdistill.students.heads.model import HeadsBatch, HeadsStudent, collate_heads, examples_of, held_out
from microdistill.train.config import TrainConfig, TrainError
from microdistill.train.setup import Setup, make_optimizer, seed_everything


def heads_loss(model: HeadsStudent, b: HeadsBatch, cfg: TrainConfig, w_div: float, progress: float,
               probe=None) -> tuple[dict, torch.Tensor]:
    """The loss's sums over every field of the batch, and the share of decisions right."""
    logits = model(b.ids, b.mask)
    lam = taid_lambda(progress) if cfg.divergence == "taid" else None
    every = torch.ones(len(b.ids), dtype=torch.bool)
    sums = [output_sums(z, b.teacher[k] if b.teacher is not None else None, b.target[:, k], every,
                        divergence=cfg.divergence, T=cfg.temperature, beta=cfg.beta, alpha=cfg.alpha, lam=lam)
            for k, z in enumerate(logits)]
    parts = {key: sum(p[key] for p in sums) for key in ("divergence_sum", "ce_sum", "n")}
    parts["teacher"] = b.teacher is not None
    parts["loss"] = total_loss(parts, w_div)
    acc = torch.stack([z.argmax(-1) == b.target[:, k] for k, z in enumerate(logits)]).float().mean()
    return parts, acc


def set_up_heads(shards: ShardSet, cfg: TrainConfig, use_logits: bool, progress: bool) -> Setup:
    """The classifier-head student on a pretrained encoder (its whole input vocabulary, or the pieces
    the training inputs use), and an optimiser that moves the encoder slowly."""
    if cfg.on_policy:
        raise TrainError("training option on_policy is for the decoder student, which writes answers to learn from; "
                         "heads choose each field's value in one step")
    fields = enum_fields(shards.task(), f"shard folder {shards.dir}")
    if cfg.tail:
        raise TrainError("training option tail=True is for the decoder student; heads score only the allowed values")
    train_records = list(shards.records("train"))[:cfg.limit_train]
    val_records = list(shards.records("val"))[:cfg.eval_limit]
    if not train_records:
        raise TrainError(f"shard folder {shards.dir}: no train examples")
    if use_logits and any(set(r.decisions) != {f.name for f in fields} for r in train_records + val_records):
        raise TrainError(f"shard folder {shards.dir}: examples without the teacher's decision points (older or "
                         "text-only shards); extract again, or train on the teacher's text alone with --signal text")
    texts = [r.text for r in train_records]
    if is_teacher_spec(cfg.encoder):
        body, tokens, name = cut_teacher(cfg.encoder, shards, texts, cfg.encoder_layers, cfg.mlp_width, progress,
                                         outputs=sum(len(f.values) for f in fields))
        tokenizer, source, pieces = tokens, f"teacher:{name}", len(tokens.input_vocab)
    else:
        if cfg.mlp_width is not None:
            raise TrainError("training option mlp_width is for a body cut from the teacher (--encoder teacher)")
        say(f"loading the pretrained encoder {cfg.encoder}", progress)
        encoder = load_encoder(cfg.encoder)
        body, source = encoder.model, encoder.source
        if cfg.encoder_layers is not None:
            keep_layers(body, cfg.encoder_layers)
        tokens = {**encoder.tokenizer_json, "truncation": None, "padding": None}  # callers pad and cut their batches
        if cfg.input_vocab == "corpus":
            tokens, old_ids = prune_vocabulary(tokens, texts)
            prune_embeddings(body, old_ids)
        tokenizer, pieces = tokenizer_from_json(tokens), body.config.vocab_size
    train_set = examples_of(train_records + augmented(train_records, cfg), tokenizer, fields, use_logits)
    val_set = examples_of(val_records, tokenizer, fields, False)
    seed_everything(cfg.seed)
    model = HeadsStudent(body, [len(f.values) for f in fields], cfg.dropout)
    if cfg.init_from:
        warm_start(model, Path(cfg.init_from), shards)
    total = cfg.max_steps or cfg.epochs * math.ceil(len(train_set) / cfg.batch_size)
    n = compute_parameters(model)
    return Setup(
        shards, use_logits, train_set, model, None,
        make_optimizer(model, cfg, pretrained=list(model.encoder.parameters())), total,
        collate=collate_heads, loss=heads_loss,
        evaluate=lambda: held_out(model, fields, val_set, cfg.batch_size),
        save=lambda out: save_and_calibrate(model, tokens, shards, out, source, cfg, progress),
        info={"encoder": source, "input_pieces": pieces, "layers": body.config.num_hidden_layers},
        title=f"heads: {n / 1e6:.1f}M compute parameters (encoder {source}, {body.config.num_hidden_layers} layers, "
              f"{pieces} input pieces, {len(fields)} fields)")


def warm_start(model: HeadsStudent, folder: Path, shards: ShardSet) -> None:
    """`model` takes the weights of the heads student in `folder`, which must do the shards' task
    with the same body (encoder, layers, input pieces)."""
    from microdistill.students import load_student

    where = f"training option init_from={str(folder)!r}"
    if not (folder / "config.json").is_file():
        raise TrainError(f"{where}: not a student folder (no config.json)")
    start = load_student(folder)
    if getattr(start, "kind", None) != "heads":
        raise TrainError(f"{where}: a {getattr(start, 'kind', '?')} student; a warm start needs a heads student")
    if start.task.fingerprint() != shards.task().fingerprint():
        raise TrainError(f"{where}: a student of another task than the shard folder {shards.dir}")
    mine, theirs = model.state_dict(), start.model.state_dict()
    if mine.keys() != theirs.keys() or any(mine[k].shape != theirs[k].shape for k in mine):
        raise TrainError(f"{where}: another body than this run's (encoder, layers or input vocabulary differ)")
    model.load_state_dict(theirs)


def augmented(records: list, cfg: TrainConfig) -> list:
    """A `cfg.augment` share of `records`, each with its text edited without changing its meaning
    (data/edits.py) and the teacher's answer to the original; an edit that changes nothing is left out."""
    rng = random.Random(cfg.seed)
    picked = [r for r in records if rng.random() < cfg.augment]
    edited = [dataclasses.replace(r, text=augment(r.text, rng)) for r in picked]
    return [e for e, r in zip(edited, picked) if e.text != r.text]


def save_and_calibrate(model: HeadsStudent, tokens, shards: ShardSet, out, encoder_source: str,
                       cfg: TrainConfig, progress: bool) -> None:
    """Write the student folder, then its calibration.json when the shards hold enough held-out inputs."""
    save_heads(model, tokens, shards, out, encoder_source, extra={"training": cfg.to_dict()})
    if shards.manifest.get("counts", {}).get("val", 0) >= 2 * FOLDS:
        calibrate_confidence(out, shards.dir, progress)
    else:
        say("no calibration.json: too few held-out examples to fit the confidence's temperatures on", progress)
