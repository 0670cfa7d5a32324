"""Synthetic shard folders for tests: a learnable labelling rule and a fake white-box teacher.

    from synthetic import make_shards
    shards_dir = make_shards(tmp_path / "shards", tiny_tokenizer, n=64)

Inputs are short word sequences; the teacher's answer for the reddit-comment task is a fixed
function of which words appear (an insult wins over praise, praise over complaint), so a
tiny student can learn it. Teacher logits are random but peaked on the chosen token, and
the full-vocabulary log-sum-exp leaves a little mass outside the kept set, as a real teacher does.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
from safetensors.numpy import save as st_save

from microdistill.data.shards import INPUT_EMBEDDINGS, Record, ShardWriter, atomic_write_bytes
from microdistill.core.task import load_task
from microdistill.data.vocab import build_input_vocab

INSULTS = ["idiot", "troll", "worthless", "stupid"]
PRAISE = ["thanks", "lovely", "great", "love"]
COMPLAINTS = ["worst", "awful", "broken", "hate"]
FILLER = ["the", "update", "is", "day", "beach", "service", "fine", "nothing", "with", "friends", "today", "my"]


def label(text: str) -> dict[str, str]:
    """The rule the synthetic teacher follows."""
    words = set(text.split())
    if words & set(INSULTS):
        return {"tone": "aggressive", "sentiment": "negative", "safety": "harmful", "toxicity": "toxic"}
    if words & set(PRAISE):
        return {"tone": "neutral", "sentiment": "positive", "safety": "safe", "toxicity": "respectful"}
    if words & set(COMPLAINTS):
        return {"tone": "neutral", "sentiment": "negative", "safety": "safe", "toxicity": "respectful"}
    return {"tone": "neutral", "sentiment": "neutral", "safety": "safe", "toxicity": "respectful"}


def make_texts(n: int, seed: int = 0) -> list[str]:
    """`n` distinct inputs of 3..8 words; about a quarter in each label class."""
    rng = np.random.default_rng(seed)
    kinds = [INSULTS, PRAISE, COMPLAINTS, None]
    texts: list[str] = []
    seen: set[str] = set()
    while len(texts) < n:
        words = list(rng.choice(FILLER, size=int(rng.integers(2, 7))))
        key = kinds[len(texts) % 4]
        if key is not None:
            words.insert(int(rng.integers(0, len(words) + 1)), str(rng.choice(key)))
        text = " ".join(words)
        if text not in seen:
            seen.add(text)
            texts.append(text)
    return texts


def teacher_embeddings(tokenizer, seed: int = 0, width: int = 24) -> np.ndarray:
    """A fake teacher's input embedding table, float32 [len(tokenizer), width]: random rows
    with a few strong directions, as a trained table has."""
    rng = np.random.default_rng(seed + 2)
    scale = np.geomspace(1.0, 0.05, width).astype(np.float32)
    return rng.normal(0.0, 1.0, size=(len(tokenizer), width)).astype(np.float32) * scale


def make_shards(
    path: Path, tokenizer, n: int = 64, with_logits: bool = True, seed: int = 0, task_name: str = "reddit-comment",
    shard_size: int = 32, labels: bool = False, teacher_sha256: str = "0" * 64, input_embeddings: bool = True,
    hidden: int = 0,
) -> Path:
    """Write a complete shard folder of `n` examples to `path` and return `path`.

    labels=True also stores the rule's answer as human labels; `teacher_sha256` lets a test
    make shards that look like they came from another teacher. input_embeddings (on by default,
    as a decoder student needs them and no real teacher stands behind these shards to compute
    them) writes the teacher's input embedding rows: those of `teacher_embeddings(tokenizer, seed)`.
    hidden=H > 0 also stores a fake teacher hidden state [H] per input (manifest hidden_layer 1):
    the mean of fixed random word vectors plus a direction for the input's label.
    """
    path = Path(path)
    task = load_task(task_name)
    eos = tokenizer.convert_tokens_to_ids(tokenizer.eos_token)
    texts = make_texts(n, seed)
    outputs = [task.serialize(label(t)) for t in texts]
    input_ids = [tokenizer.encode(t, add_special_tokens=False) for t in texts]
    output_ids = [tokenizer.encode(o, add_special_tokens=False) + [eos] for o in outputs]

    # kept = every token the outputs use + EOS + a single-character token for each character
    # a valid output may contain, so constrained decoding can always continue.
    single = set()
    for ch in task.output_alphabet():
        ids = tokenizer.encode(ch, add_special_tokens=False)
        if len(ids) == 1:
            single.add(ids[0])
    kept = sorted({i for ids in output_ids for i in ids} | {eos} | single)
    position = {tid: k for k, tid in enumerate(kept)}
    input_vocab = build_input_vocab(tokenizer, input_ids)

    tok_dir = path / "tokenizer"
    tok_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(tok_dir))
    header = {
        "task": task.model_dump(),
        "task_fingerprint": task.fingerprint(),
        "teacher": {
            "name": "synthetic", "source": "tests/synthetic.py", "sha256": teacher_sha256,
            "tokenizer_sha256": hashlib.sha256(json.dumps(tokenizer.get_vocab(), sort_keys=True).encode()).hexdigest(),
            "vocab_size": len(tokenizer),
        },
        "signal": "logits" if with_logits else "text",
        "vocab": {
            "kept": kept, "kept_tokens": tokenizer.convert_ids_to_tokens(kept), "n_required": len(kept),
            "eos": eos, "input": input_vocab, "coverage": 0.95,
        },
    }
    if input_embeddings:
        rows = teacher_embeddings(tokenizer, seed)[input_vocab].astype(np.float16)
        atomic_write_bytes(path / INPUT_EMBEDDINGS, st_save({"rows": rows}))
        header["input_embeddings"] = INPUT_EMBEDDINGS
    if hidden:
        header["hidden_layer"] = 1
        hrng = np.random.default_rng(seed + 3)
        word_vec = {w: hrng.normal(0.0, 1.0, hidden) for w in INSULTS + PRAISE + COMPLAINTS + FILLER}
        label_vec = {k: hrng.normal(0.0, 3.0, hidden) for k in ("aggressive", "positive", "negative", "neutral")}
    writer = ShardWriter(path, header, shard_size=shard_size)
    rng = np.random.default_rng(seed + 1)
    for text, out, ii, oi in zip(texts, outputs, input_ids, output_ids):
        fields = label(text)
        logits = lse = None
        if with_logits:
            logits = rng.normal(0.0, 1.0, size=(len(oi), len(kept))).astype(np.float32)
            logits[np.arange(len(oi)), [position[t] for t in oi]] += 6.0
            m = logits.max(axis=1)
            # 5% of the probability mass lies outside the kept vocabulary.
            lse = m + np.log(np.exp(logits - m[:, None]).sum(axis=1) / 0.95)
        decisions = {}
        for f in task.enum_fields:
            p = np.full(len(f.values), 0.02, dtype=np.float32)
            p[f.values.index(fields[f.name])] = 1.0
            decisions[f.name] = p / p.sum()
        writer.add(Record(
            text=text, input_ids=ii, output_ids=oi, output_text=out, fields=fields, logits=logits, lse=lse,
            decisions=decisions, labels=dict(fields) if labels else None,
            hidden=(np.mean([word_vec[w] for w in text.split()], axis=0)
                    + label_vec[fields["tone"] if fields["tone"] == "aggressive" else fields["sentiment"]]) if hidden else None,
        ))
    writer.close()
    return path


def whole_and_resumed(data, tmp_path, cfg, keep_checkpoint=True):
    """Train `cfg` once straight through and once interrupted at step 2 then resumed; the
    resumed run must end with the same weights (its last checkpoint kept, for the refusals tests
    try on it). Returns both folders."""
    import os
    import signal

    import pytest
    import torch
    from safetensors.torch import load_file

    from microdistill.train import TrainingInterrupted, train

    whole = train(data, tmp_path / "whole", cfg, progress=False)

    def interrupt(step: int) -> None:
        if step == 2:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(TrainingInterrupted):
        train(data, tmp_path / "split", cfg, progress=False, on_step=interrupt)
    split = train(data, tmp_path / "split", cfg, resume=True, progress=False, keep_checkpoint=keep_checkpoint)
    a, b = load_file(str(whole / "model.safetensors")), load_file(str(split / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    return whole, split
