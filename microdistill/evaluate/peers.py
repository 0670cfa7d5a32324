"""Peer baselines: is the student better than the obvious alternative?

    from microdistill.evaluate.peers import score_peers
    for row in score_peers("runs/default/shards"):
        print(row["name"], f"{row['exact_match']:.1%}", row["exact_ci95"], row["fit_s"])

(`microdistill eval` will show these rows beside the student's.)

A student is only worth its training run if it beats what an afternoon with scikit-learn
would give. Each peer learns from the SAME teacher answers as the student (the shard folder's
train split, input text -> the teacher's fields) and is scored on the held-out val split
against the teacher's answers, exactly as the student is:

    tfidf     word 1-2-grams + char_wb 2-5-grams (sublinear tf) -> one logistic regression per
              field: the classic strong text-classification baseline, trained in seconds.
    encoder   frozen all-MiniLM-L6-v2 sentence embeddings (mean over real tokens, L2-normalised,
              as sentence-transformers computes them) -> one logistic regression per field: what
              pretrained meaning buys without any fine-tuning.

Peers answer enum fields only; a field with a single value in training is predicted as that
constant. A student that does not beat both is not yet worth deploying.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from microdistill.evaluate.agreement import agreement, wilson_interval
from microdistill.core.console import say
from microdistill.core.errors import UserError
from microdistill.data.shards import Record, ShardSet
from microdistill.core.task import EnumField, Task

PEERS = ("tfidf", "encoder")
ENCODER = "minilm"  # the microdistill.students.encoder preset the encoder peer embeds with
MAX_TOKENS = 256  # all-MiniLM-L6-v2's max_seq_length in sentence-transformers
BATCH = 64

Predictor = Callable[[Sequence[str]], list[dict[str, Any]]]


class PeerError(UserError):
    """A peer that cannot be trained or scored on these shards; one line for the user."""


def _check(name: str, train: Sequence[Record], task: Task) -> list[EnumField]:
    """The task's fields, after checking that the peer exists and can learn them from `train`."""
    if name not in PEERS:
        raise PeerError(f"unknown peer {name!r}; choose from {', '.join(PEERS)}")
    free = [f.name for f in task.output.fields if not isinstance(f, EnumField)]
    if free:
        raise PeerError(f"task {task.name!r} has free-text or number fields ({', '.join(free)}); "
                        "peer baselines handle enum fields only")
    if not train:
        raise PeerError(f"peer {name}: no train examples to learn from")
    return list(task.enum_fields)


def _check_val(name: str, val: Sequence[Record]) -> None:
    if not val:
        raise PeerError(f"peer {name}: no val examples to score on")


def _heads(x_train, train: Sequence[Record], fields: list[EnumField], c: float, seed: int) -> Callable:
    """One logistic regression per field on features x_train; a field with one training value
    is that constant. Returns features -> list of answers."""
    from sklearn.linear_model import LogisticRegression

    models: dict[str, Any] = {}
    for f in fields:
        y = [r.fields[f.name] for r in train]
        if len(set(y)) == 1:
            models[f.name] = y[0]
        else:
            models[f.name] = LogisticRegression(C=c, max_iter=5000, random_state=seed).fit(x_train, y)

    def predict(x) -> list[dict[str, Any]]:
        n = x.shape[0]
        cols = {k: [str(v) for v in m.predict(x)] if hasattr(m, "predict") else [m] * n for k, m in models.items()}
        return [{f.name: cols[f.name][i] for f in fields} for i in range(n)]

    return predict


def _fit_tfidf(train: Sequence[Record], fields: list[EnumField], seed: int) -> Predictor:
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.pipeline import FeatureUnion

    features = FeatureUnion([
        ("word", TfidfVectorizer(analyzer="word", ngram_range=(1, 2), sublinear_tf=True, token_pattern=r"(?u)\b\w+\b")),
        ("char", TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 5), sublinear_tf=True)),
    ])
    try:
        x = features.fit_transform([r.text for r in train])
    except ValueError as e:  # e.g. "empty vocabulary" when every text is blank
        raise PeerError(f"peer tfidf: cannot build features from the train texts ({e})") from None
    heads = _heads(x, train, fields, 10.0, seed)
    return lambda texts: heads(features.transform(list(texts)))


def _embedder(spec: str = ENCODER) -> Callable[[Sequence[str]], np.ndarray]:
    """texts -> float32 [n, D]: the frozen encoder's final states averaged over real tokens,
    L2-normalised; full vocabulary, batches padded to their longest text."""
    import torch

    from microdistill.data.vocab import tokenizer_from_json
    from microdistill.students.heads.encoder import load_encoder

    pretrained = load_encoder(spec)
    model = pretrained.model.eval()
    tok = tokenizer_from_json(pretrained.tokenizer_json)
    pad = pretrained.tokenizer_json["model"]["vocab"].get("[PAD]", 0)
    tok.enable_truncation(MAX_TOKENS)
    tok.enable_padding(pad_id=pad, pad_token="[PAD]")

    def embed(texts: Sequence[str]) -> np.ndarray:
        out = []
        with torch.no_grad():
            for i in range(0, len(texts), BATCH):
                enc = tok.encode_batch(list(texts[i:i + BATCH]))
                ids = torch.tensor([e.ids for e in enc], dtype=torch.long)
                mask = torch.tensor([e.attention_mask for e in enc], dtype=torch.long)
                h = model(input_ids=ids, attention_mask=mask).last_hidden_state
                m = mask.unsqueeze(-1).to(h.dtype)
                pooled = (h * m).sum(1) / m.sum(1).clamp_min(1e-9)
                out.append(torch.nn.functional.normalize(pooled, p=2, dim=1).float().numpy())
        return np.concatenate(out) if out else np.zeros((0, model.config.hidden_size), np.float32)

    return embed


def _fit_encoder(train: Sequence[Record], fields: list[EnumField], seed: int) -> Predictor:
    embed = _embedder()
    heads = _heads(embed([r.text for r in train]), train, fields, 10.0, seed)
    return lambda texts: heads(embed(list(texts)))


def fit(name: str, train: Sequence[Record], task: Task, seed: int = 0) -> Predictor:
    """The peer `name` trained on the teacher's answers in `train`: texts -> answers."""
    fields = _check(name, train, task)
    return (_fit_tfidf if name == "tfidf" else _fit_encoder)(train, fields, seed)


def fit_predict(name: str, train: Sequence[Record], val: Sequence[Record], task: Task, seed: int = 0) -> list[dict]:
    """The peer's answer (field -> value, the task's field order) for each val record."""
    _check(name, train, task)
    _check_val(name, val)
    return fit(name, train, task, seed)([r.text for r in val])


def score_peer(name: str, train: Sequence[Record], val: Sequence[Record], task: Task, seed: int = 0) -> dict:
    """Train the peer on `train` and score it against the teacher's answers on `val`."""
    fields = _check(name, train, task)
    _check_val(name, val)
    t0 = time.perf_counter()
    predict = fit(name, train, task, seed)
    fit_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    answers = predict([r.text for r in val])
    predict_s = time.perf_counter() - t0
    hits = sum(a == {f.name: r.fields[f.name] for f in fields} for a, r in zip(answers, val, strict=True))
    return {
        "name": name,
        "exact_match": hits / len(val),
        "exact_ci95": tuple(float(b) for b in wilson_interval(hits, len(val))),
        "fields": {f.name: agreement([r.fields[f.name] for r in val], [a[f.name] for a in answers]) for f in fields},
        "n_train": len(train),
        "n_val": len(val),
        "fit_s": fit_s,
        "predict_ms_per_input": 1000 * predict_s / len(val),
    }


def score_peers(shards_dir: str | Path, names: Sequence[str] = PEERS, seed: int = 0, limit_train: int | None = None,
                progress: bool = True, limit_val: int | None = None) -> list[dict]:
    """Each peer in `names`, trained on the shard folder's train split and scored on its val
    split (the first `limit_val` examples, as an evaluation limited to them scores the student)."""
    unknown = [n for n in names if n not in PEERS]
    if unknown:
        raise PeerError(f"unknown peer(s) {', '.join(map(repr, unknown))}; choose from {', '.join(PEERS)}")
    shards = ShardSet(Path(shards_dir))
    task = shards.task()
    train = list(shards.records("train"))[:limit_train]
    val = list(shards.records("val"))[:limit_val]
    rows = []
    for name in names:
        say(f"peer {name}: training on {len(train)} teacher answers, scoring on {len(val)} held out", progress)
        row = score_peer(name, train, val, task, seed)
        say(f"peer {name}: exact match {row['exact_match']:.1%} "
            f"({row['exact_ci95'][0]:.0%}-{row['exact_ci95'][1]:.0%}), fit {row['fit_s']:.1f}s", progress)
        rows.append(row)
    return rows
