"""corpus.py: every reader format, every error path, and the filter counts."""

from __future__ import annotations

import csv
import json

import pytest

from microdistill.data.corpus import CorpusError, FilterReport, Item, filter_inputs, read_corpus
from microdistill.core.task import task_from_dict

ROWS = [
    {"body": "first comment here", "label": 1, "other": "x"},
    {"body": "second one, café ☕", "label": 0, "other": "y"},
    {"body": "third", "label": None, "other": "z"},
]


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def _expected(rows=ROWS):
    return [
        Item(r["body"], {"toxicity": str(r["label"])} if r["label"] is not None else None) for r in rows
    ]


# ---- formats -------------------------------------------------------------------------------
def test_txt_one_input_per_non_empty_line(tmp_path):
    p = tmp_path / "c.txt"
    p.write_text("alpha beta\n\n   \ngamma\r\nlast line without newline", encoding="utf-8")
    assert [i.text for i in read_corpus(p)] == ["alpha beta", "gamma", "last line without newline"]
    assert all(i.labels is None for i in read_corpus(p))


def test_jsonl_field_and_labels_as_strings(tmp_path):
    p = _write_jsonl(tmp_path / "c.jsonl", ROWS)
    assert read_corpus(p, field="body", labels={"toxicity": "label"}) == _expected()
    assert [i.labels for i in read_corpus(p, field="body")] == [None, None, None]


def test_csv_column_and_labels(tmp_path):
    p = tmp_path / "c.csv"
    with open(p, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=["other", "body", "label"])
        w.writeheader()
        for r in ROWS[:2]:  # csv has no null: an empty cell is the empty string
            w.writerow(r)
        w.writerow({"other": "z", "body": 'quoted, "multi"\nline', "label": 1})
    items = read_corpus(p, field="body", labels={"toxicity": "label"})
    assert items[:2] == _expected(ROWS[:2])
    assert items[2] == Item('quoted, "multi"\nline', {"toxicity": "1"})


def test_parquet_column_and_labels(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    p = tmp_path / "c.parquet"
    pq.write_table(pa.Table.from_pylist(ROWS), p)
    assert read_corpus(p, field="body", labels={"toxicity": "label"}) == _expected()


def test_datasets_folder_single_dataset(tmp_path):
    import datasets

    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "ds"))
    assert read_corpus(tmp_path / "ds", field="body", labels={"toxicity": "label"}) == _expected()


def test_datasets_dict_uses_train_or_the_only_split(tmp_path):
    import datasets

    train = datasets.Dataset.from_list(ROWS[:2])
    test = datasets.Dataset.from_list(ROWS[2:])
    datasets.DatasetDict({"test": test, "train": train}).save_to_disk(str(tmp_path / "dd"))
    assert [i.text for i in read_corpus(tmp_path / "dd", field="body")] == [r["body"] for r in ROWS[:2]]
    datasets.DatasetDict({"validation": test}).save_to_disk(str(tmp_path / "one"))
    assert [i.text for i in read_corpus(tmp_path / "one", field="body")] == [ROWS[2]["body"]]
    datasets.DatasetDict({"validation": test, "test": train}).save_to_disk(str(tmp_path / "two"))
    with pytest.raises(CorpusError, match=r"two: several splits \(validation, test\)"):
        read_corpus(tmp_path / "two", field="body")


# ---- errors --------------------------------------------------------------------------------
def _error(path, **kw) -> str:
    with pytest.raises(CorpusError) as e:
        read_corpus(path, **kw)
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg
    return msg


def test_missing_file_and_unknown_format(tmp_path):
    assert "not found" in _error(tmp_path / "nope.txt")
    p = tmp_path / "c.xlsx"
    p.write_text("x")
    assert "unknown format '.xlsx'" in _error(p)
    (tmp_path / "plain").mkdir()
    assert "not a saved datasets folder" in _error(tmp_path / "plain")


@pytest.mark.parametrize("name", ["c.txt", "c.jsonl"])
def test_empty_corpus(tmp_path, name):
    p = tmp_path / name
    p.write_text("\n  \n\n")
    assert "empty corpus" in _error(p)


def test_missing_field_lists_available(tmp_path):
    p = _write_jsonl(tmp_path / "c.jsonl", ROWS)
    assert "no field 'text' (available: body, label, other)" in _error(p)
    assert "no field 'gold'" in _error(p, field="body", labels={"toxicity": "gold"})
    c = tmp_path / "c.csv"
    c.write_text("body,label\nhello,1\n")
    assert "no field 'text' (available: body, label)" in _error(c)


def test_missing_column_in_columnar_formats(tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(ROWS), tmp_path / "c.parquet")
    assert "no column 'text' (available: body, label, other)" in _error(tmp_path / "c.parquet")
    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "ds"))
    assert "no column 'gold'" in _error(tmp_path / "ds", field="body", labels={"x": "gold"})


def test_unreadable_files(tmp_path):
    bad = _write_jsonl(tmp_path / "c.jsonl", ROWS)
    bad.write_text(bad.read_text() + "{not json\n")
    assert "record 4 is not valid JSON" in _error(bad, field="body")
    arr = tmp_path / "a.jsonl"
    arr.write_text("[1, 2]\n")
    assert "record 1 is not a JSON object" in _error(arr)
    latin = tmp_path / "l.txt"
    latin.write_bytes("caf\xe9\n".encode("latin-1"))
    assert "not UTF-8" in _error(latin)
    junk = tmp_path / "j.parquet"
    junk.write_bytes(b"not a parquet file at all")
    assert "unreadable parquet" in _error(junk)
    txt = tmp_path / "t.txt"
    txt.write_text("hello\n")
    assert "has no label columns" in _error(txt, labels={"a": "b"})


# ---- filters -------------------------------------------------------------------------------
def _task(**inputs):
    return task_from_dict(
        {
            "name": "t",
            "prompt": {"system": "s"},
            "output": {"fields": [{"name": "tone", "values": ["a", "b"]}]},
            "inputs": inputs,
        }
    )


def test_filter_counts_each_rule(tiny_tokenizer):
    task = _task(
        min_tokens=3,
        max_tokens=25,
        reject=[r"https?://\S+", r"(^|\s)#\w+", r"www\."],
        strip=[r"@user\b", r"@\w+"],
    )
    long_text = " ".join("qz" for _ in range(40))
    items = [
        Item("@user you are an idiot", {"tone": "a"}),  # kept, stripped
        Item("@user @bob"),  # empty after strip
        Item("see https://x.io and www.y.com now please"),  # first matching pattern counts
        Item("visit www.example.com for more"),
        Item("love it #blessed so much today"),
        Item("ok"),  # too short
        Item(long_text),  # too long
        Item("You  are an   IDIOT"),  # duplicate of the first after normalising
        Item("thanks so much, this fixed my problem!"),
        Item("   "),  # empty after strip
    ]
    kept, report = filter_inputs(items, task, tiny_tokenizer, source="c.txt")
    assert [i.text for i in kept] == ["you are an idiot", "thanks so much, this fixed my problem!"]
    assert kept[0].labels == {"tone": "a"}
    assert report.as_dict() == {
        "read": 10,
        "empty_after_strip": 2,
        "rejected": {r"https?://\S+": 1, r"(^|\s)#\w+": 1, r"www\.": 1},
        "too_short": 1,
        "too_long": 1,
        "duplicate": 1,
        "kept": 2,
    }
    assert report.summary().startswith("kept 2 of 10 inputs")
    assert "too_long=1" in report.summary() and "\n" not in report.summary()


def test_filter_length_bounds_are_inclusive_and_dedupe_optional(tiny_tokenizer):
    texts = ["you are an idiot", "nobody likes you", "you are an idiot", "x"]
    lengths = [len(tiny_tokenizer(t, add_special_tokens=False).input_ids) for t in texts]
    lo, hi = min(lengths[:3]), max(lengths[:3])
    assert lengths[3] < lo  # "x" is one token
    kept, report = filter_inputs([Item(t) for t in texts], _task(min_tokens=lo, max_tokens=hi, dedupe=False), tiny_tokenizer)
    assert [i.text for i in kept] == texts[:3] and report.too_short == 1 and report.duplicate == 0
    kept, report = filter_inputs([Item(t) for t in texts], _task(min_tokens=lo, max_tokens=hi - 1), tiny_tokenizer)
    assert report.too_long == sum(n == hi for n in lengths[:3]) > 0


def test_all_filtered_out_raises_one_line(tiny_tokenizer):
    with pytest.raises(CorpusError) as e:
        filter_inputs([Item("ok"), Item("@x")], _task(min_tokens=5, strip=[r"@\w+"]), tiny_tokenizer, source="data/c.csv")
    msg = str(e.value)
    assert msg.startswith("all 2 inputs from data/c.csv were filtered out:")
    assert "too_short=1" in msg and "empty_after_strip=1" in msg and "\n" not in msg


def test_report_defaults():
    assert FilterReport().as_dict()["rejected"] == {}
