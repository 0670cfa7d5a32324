"""Peer baselines: trained on the teacher's answers, scored on the held-out split against them.
The tfidf peer learns the synthetic rule, its score is its own predictions' exact match, a field
with one training value is predicted constant, non-enum tasks are refused in one line, and the
frozen-encoder peer embeds as sentence-transformers does and beats chance."""

from __future__ import annotations

import dataclasses
from collections import Counter

import numpy as np
import pytest
from synthetic import label, make_shards

from microdistill.core.errors import UserError
from microdistill.evaluate.peers import PEERS, PeerError, fit_predict, score_peer, score_peers
from microdistill.data.shards import Record, ShardSet
from microdistill.core.task import task_from_dict


@pytest.fixture(scope="module")
def shards(tmp_path_factory, tiny_tokenizer):
    return ShardSet(make_shards(tmp_path_factory.mktemp("peers") / "shards", tiny_tokenizer, n=240, with_logits=False))


def majority_exact(train: list[Record], val: list[Record]) -> float:
    """Exact match of always answering the most common training answer: chance for this test."""
    common = Counter(tuple(sorted(r.fields.items())) for r in train).most_common(1)[0][0]
    return sum(tuple(sorted(r.fields.items())) == common for r in val) / len(val)


def hand_scores(preds: list[dict], val: list[Record], names: list[str]) -> tuple[float, dict[str, float]]:
    """Exact match and per-field agreement, against the synthetic rule itself (== the teacher's answers)."""
    truth = [label(r.text) for r in val]
    assert truth == [r.fields for r in val]
    exact = sum(all(p[k] == t[k] for k in names) for p, t in zip(preds, truth)) / len(val)
    return exact, {k: sum(p[k] == t[k] for p, t in zip(preds, truth)) / len(val) for k in names}


def test_tfidf_learns_the_rule_and_scores_its_own_predictions(shards):
    task, train, val = shards.task(), shards.load("train"), shards.load("val")
    names = task.field_names
    assert len(val) >= 15
    chance = majority_exact(train, val)
    row = score_peer("tfidf", train, val, task)
    assert row["name"] == "tfidf" and (row["n_train"], row["n_val"]) == (len(train), len(val))
    assert row["exact_match"] >= 0.9 and row["exact_match"] >= chance + 0.4
    preds = fit_predict("tfidf", train, val, task)
    assert [list(p) for p in preds] == [names] * len(val)  # answers in the task's field order
    exact, fields = hand_scores(preds, val, names)
    assert row["exact_match"] == exact
    assert row["fields"] == pytest.approx(fields)
    lo, hi = row["exact_ci95"]
    assert lo <= exact <= hi and hi - lo > 0.05
    assert row["fit_s"] > 0 and row["predict_ms_per_input"] > 0

    # trained on a handful, the peer makes mistakes: the score must still be its predictions' own
    few = train[:10]
    small = score_peer("tfidf", few, val, task)
    exact, fields = hand_scores(fit_predict("tfidf", few, val, task), val, names)
    assert 0 < exact < 1
    assert small["exact_match"] == exact and small["fields"] == pytest.approx(fields)
    assert small["exact_match"] < row["exact_match"]


def test_a_field_with_one_training_value_is_predicted_constant(shards):
    task, train, val = shards.task(), shards.load("train"), shards.load("val")
    # the teacher said "safe" to every training input; val keeps its harmful examples
    flat = [dataclasses.replace(r, fields={**r.fields, "safety": "safe"}) for r in train]
    assert any(r.fields["safety"] == "harmful" for r in val)
    preds = fit_predict("tfidf", flat, val, task)
    assert {p["safety"] for p in preds} == {"safe"}
    row = score_peer("tfidf", flat, val, task)
    assert row["fields"]["safety"] == pytest.approx(sum(r.fields["safety"] == "safe" for r in val) / len(val))
    assert row["fields"]["sentiment"] >= 0.9  # the other fields are still learnt
    # every field constant: the peer answers the one training answer everywhere
    same = [dataclasses.replace(r, fields=dict(train[0].fields)) for r in train]
    assert fit_predict("tfidf", same, val, task) == [train[0].fields] * len(val)


def test_non_enum_tasks_and_missing_data_are_one_line_errors(shards):
    task = task_from_dict({
        "name": "tickets", "prompt": {"system": "Route the ticket."},
        "output": {"fields": [{"name": "team", "values": ["billing", "tech"]},
                              {"name": "summary", "type": "string"}]},
    })
    recs = [Record(text=f"ticket {i}", input_ids=[1], output_ids=[2], output_text="",
                   fields={"team": ["billing", "tech"][i % 2], "summary": "x"}) for i in range(6)]
    for name in PEERS:
        with pytest.raises(PeerError) as e:
            score_peer(name, recs, recs, task)
        msg = str(e.value)
        assert "\n" not in msg and "summary" in msg and "team" not in msg and "enum" in msg
        assert isinstance(e.value, UserError)
    syn_task, train = shards.task(), shards.load("train")
    with pytest.raises(PeerError, match="no val examples"):
        score_peer("tfidf", train, [], syn_task)
    with pytest.raises(PeerError, match="no train examples"):
        score_peer("tfidf", [], train, syn_task)
    with pytest.raises(PeerError, match="unknown peer 'knn'"):
        score_peer("knn", train, train, syn_task)
    with pytest.raises(PeerError, match=r"unknown peer\(s\) 'knn'"):
        score_peers(shards.dir, names=("tfidf", "knn"), progress=False)


def test_score_peers_reads_the_shard_folder(shards):
    rows = score_peers(shards.dir, names=("tfidf",), limit_train=50, progress=False)
    assert [r["name"] for r in rows] == ["tfidf"]
    assert rows[0]["n_train"] == 50 and rows[0]["n_val"] == len(shards.load("val"))
    assert rows[0]["exact_match"] == score_peer("tfidf", shards.load("train")[:50], shards.load("val"), shards.task())["exact_match"]


def test_encoder_peer_embeds_like_sentence_transformers_and_beats_chance(shards):
    from microdistill.evaluate.peers import _embedder

    embed = _embedder()
    texts = ["thanks", "thanks, this is the best update of the whole year with my friends at the beach"]
    both, alone = embed(texts), embed(texts[:1])
    assert both.shape == (2, 384)
    assert np.allclose(np.linalg.norm(both, axis=1), 1.0, atol=1e-5)
    assert np.allclose(both[0], alone[0], atol=1e-5)  # padding in a batch changes nothing: real tokens only
    assert float(both[0] @ both[1]) < 0.95

    task, train, val = shards.task(), shards.load("train")[:120], shards.load("val")
    row = score_peer("encoder", train, val, task)
    assert row["exact_match"] >= majority_exact(train, val) + 0.3
    assert row["exact_match"] == hand_scores(fit_predict("encoder", train, val, task), val, task.field_names)[0]
