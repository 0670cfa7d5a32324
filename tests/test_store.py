"""The shard format on its own: records round-trip exactly, a re-opened writer resumes without
duplicates, folders from another task or teacher are refused, damage is reported by file name,
and the held-out split is a stable ~10% by hash."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest

from microdistill.data.corpus import example_id
from microdistill.data.shards import (
    FORMAT,
    VAL_FRACTION,
    Record,
    ShardSet,
    ShardWriter,
    StoreError,
    decode_shard,
    encode_shard,
    split_of,
)

K, D = 7, 5  # kept vocabulary, teacher hidden width
HEADER = {
    "task": {"name": "t"}, "task_fingerprint": "f" * 16,
    "teacher": {"name": "tiny", "sha256": "0" * 64}, "signal": "logits",
    "vocab": {"kept": list(range(K)), "eos": 6, "input": [1, 2, 3], "n_required": 3, "coverage": 0.9},
}


def make_records(n: int, seed: int = 0, start: int = 0) -> list[Record]:
    """Ragged records with every optional part: logits/lse, decisions, hidden, labels."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(start, start + n):
        n_in, n_out = 1 + i % 5, 2 + (3 * i) % 7
        out.append(Record(
            text=f"example number {i} ünïcode",
            input_ids=rng.integers(0, 1000, n_in),
            output_ids=rng.integers(0, K, n_out),
            output_text=json.dumps({"a": f"v{i % 3}"}),
            fields={"a": f"v{i % 3}", "n": i},
            logits=rng.normal(0, 3, (n_out, K)),
            lse=rng.normal(5, 1, n_out),
            decisions={"a": rng.dirichlet(np.ones(3)), "b": rng.dirichlet(np.ones(2))},
            labels={"a": "v0"} if i % 2 else None,
            hidden=rng.normal(0, 1, D),
        ))
    return out


def assert_same_records(got: list[Record], want: list[Record]) -> None:
    assert [r.id for r in got] == [r.id for r in want]
    for g, w in zip(got, want):
        assert (g.text, g.output_text, g.fields, g.labels, g.split) == (w.text, w.output_text, w.fields, w.labels, w.split)
        for name, dtype in (("input_ids", np.int32), ("output_ids", np.int32), ("logits", np.float16),
                            ("lse", np.float32), ("hidden", np.float16)):
            a, b = getattr(g, name), getattr(w, name)
            assert a.dtype == dtype, (name, a.dtype)
            np.testing.assert_array_equal(a, b, err_msg=name)
        assert set(g.decisions) == set(w.decisions)
        for k in w.decisions:
            assert g.decisions[k].dtype == np.float32
            np.testing.assert_array_equal(g.decisions[k], np.asarray(w.decisions[k], dtype=np.float32))


def test_record_casts_to_the_documented_dtypes():
    r = make_records(1)[0]
    assert r.input_ids.dtype == np.int32 and r.output_ids.dtype == np.int32
    assert r.logits.dtype == np.float16 and r.lse.dtype == np.float32 and r.hidden.dtype == np.float16
    assert r.id == example_id(r.text) and r.split == split_of(r.id)
    with pytest.raises(ValueError, match="logits/lse rows"):
        Record(text="x", input_ids=[1], output_ids=[1, 2], output_text="", fields={},
               logits=np.zeros((3, K)), lse=np.zeros(3))


def test_encode_decode_round_trip(tmp_path):
    records = make_records(9)
    assert_same_records(decode_shard(encode_shard(records), tmp_path / "x"), records)


def test_text_only_shard_has_no_logits(tmp_path):
    records = [Record(text=f"t{i}", input_ids=[i, i + 1], output_ids=[3, 4, 6], output_text="{}", fields={})
               for i in range(4)]
    back = decode_shard(encode_shard(records), tmp_path / "x")
    assert [r.logits for r in back] == [None] * 4 and [r.lse for r in back] == [None] * 4
    assert [r.hidden for r in back] == [None] * 4 and all(r.decisions == {} for r in back)
    assert [r.output_ids.tolist() for r in back] == [[3, 4, 6]] * 4


def test_mixed_logits_in_one_shard_is_refused():
    a, b = make_records(2)
    b.logits = b.lse = None
    with pytest.raises(ValueError, match="either logits for every example or for none"):
        encode_shard([a, b])


def test_writer_round_trip_with_small_shards(tmp_path):
    records = make_records(23)
    w = ShardWriter(tmp_path / "s", HEADER, shard_size=5)
    for r in records:
        w.add(r)
    w.close(timings={"extract_s": 1.0})
    s = ShardSet(tmp_path / "s", verify=True)
    assert len(s.manifest["shards"]) == 5  # 4 full shards of 5 and a short one of 3
    assert [x["n"] for x in s.manifest["shards"]] == [5, 5, 5, 5, 3]
    assert [x["file"] for x in s.manifest["shards"]] == [f"shard-{i:05d}.safetensors" for i in range(5)]
    assert s.manifest["complete"] is True and s.manifest["format"] == FORMAT
    assert s.manifest["timings"] == {"extract_s": 1.0}
    assert {k: s.manifest[k] for k in HEADER} == HEADER
    assert len(s) == 23
    assert_same_records(list(s.records()), records)
    assert_same_records(s.load("val"), [r for r in records if r.split == "val"])
    np.testing.assert_array_equal(s.kept_vocab, np.arange(K))
    assert s.eos_id == 6 and s.has_logits


def test_manifest_counts_follow_split_of(tmp_path):
    records = make_records(60)
    w = ShardWriter(tmp_path / "s", HEADER, shard_size=16)
    for r in records:
        w.add(r)
    w.close()
    m = ShardSet(tmp_path / "s").manifest
    n_val = sum(split_of(example_id(r.text)) == "val" for r in records)
    assert m["counts"] == {"examples": 60, "train": 60 - n_val, "val": n_val}
    assert sum(x["n_val"] for x in m["shards"]) == n_val


def test_reopened_writer_resumes_without_duplicates(tmp_path):
    first, second = make_records(7), make_records(6, seed=1, start=7)
    w = ShardWriter(tmp_path / "s", HEADER, shard_size=4)
    for r in first:
        w.add(r)
    w.flush()  # interrupted after writing everything so far, not closed
    assert ShardSet(tmp_path / "s").manifest["complete"] is False

    w = ShardWriter(tmp_path / "s", HEADER, shard_size=4)
    assert w.n_done == 7 and w.done_ids == {r.id for r in first}
    for r in first + second:  # a re-run sees the same inputs again
        w.add(r)
    w.close()
    s = ShardSet(tmp_path / "s", verify=True)
    got = list(s.records())
    assert len(got) == 13 and len({r.id for r in got}) == 13
    assert_same_records(got, first + second)
    assert s.manifest["counts"]["examples"] == 13


def test_duplicate_in_one_run_is_written_once(tmp_path):
    r = make_records(1)[0]
    w = ShardWriter(tmp_path / "s", HEADER, shard_size=4)
    w.add(r)
    w.add(make_records(1)[0])  # the same text again
    w.close()
    assert len(ShardSet(tmp_path / "s")) == 1


@pytest.mark.parametrize("key", ShardWriter.must_match[1:])
def test_writer_with_another_header_is_refused(tmp_path, key):
    w = ShardWriter(tmp_path / "s", HEADER, shard_size=4)
    for r in make_records(3):
        w.add(r)
    w.close()
    other = {**HEADER, key: {"something": "else"}}
    with pytest.raises(StoreError, match=f"different {key.replace('_', ' ')}"):
        ShardWriter(tmp_path / "s", other)
    assert len(ShardSet(tmp_path / "s", verify=True)) == 3  # the folder is untouched


def _one_shard_folder(tmp_path):
    w = ShardWriter(tmp_path / "s", HEADER, shard_size=100)
    for r in make_records(10):
        w.add(r)
    w.close()
    return tmp_path / "s", tmp_path / "s" / "shard-00000.safetensors"


def test_truncated_shard_is_reported_by_name(tmp_path):
    folder, shard = _one_shard_folder(tmp_path)
    shard.write_bytes(shard.read_bytes()[:-1])
    with pytest.raises(StoreError, match="shard-00000.safetensors") as e:
        list(ShardSet(folder).records())
    assert "\n" not in str(e.value)


def test_flipped_bytes_fail_the_checksum(tmp_path):
    folder, shard = _one_shard_folder(tmp_path)
    data = bytearray(shard.read_bytes())
    data[-20:-10] = bytes(b ^ 0xFF for b in data[-20:-10])  # inside the tensor data: same size, still parses
    shard.write_bytes(bytes(data))
    with pytest.raises(StoreError, match=r"shard-00000\.safetensors: checksum mismatch"):
        list(ShardSet(folder).records())  # every reader checks the checksums it is given


def test_garbled_header_is_reported_by_name(tmp_path):
    folder, shard = _one_shard_folder(tmp_path)
    data = bytearray(shard.read_bytes())
    data[8:16] = b"\x00" * 8  # the JSON header no longer parses
    shard.write_bytes(bytes(data))
    with pytest.raises(StoreError, match=r"shard-00000\.safetensors: corrupted"):
        list(ShardSet(folder, verify=False).records())  # without the checksum, decoding fails with a user error


def test_missing_shard_and_manifest_are_reported(tmp_path):
    folder, shard = _one_shard_folder(tmp_path)
    shard.unlink()
    with pytest.raises(StoreError, match="listed in the manifest but missing"):
        ShardSet(folder)
    (folder / "manifest.json").write_text("{not json")
    with pytest.raises(StoreError, match="corrupted manifest"):
        ShardSet(folder)
    with pytest.raises(StoreError, match="not found"):
        ShardSet(tmp_path / "nowhere")


def test_split_of_is_deterministic_and_about_ten_percent():
    ids = [example_id(f"input {i}") for i in range(5000)]
    splits = [split_of(i) for i in ids]
    assert splits == [split_of(i) for i in ids]
    counts = Counter(splits)
    assert set(counts) == {"train", "val"}
    assert abs(counts["val"] / len(ids) - VAL_FRACTION) < 0.015  # binomial sd ~0.004
    assert split_of("00000000") == "val" and split_of("ffffffff") == "train"
    assert split_of("19999999") == "val" and split_of("1999999a") == "train"  # the boundary at 0.1 * 2**32
