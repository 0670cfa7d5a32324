"""Corpora: read the raw inputs to distil on, and keep only those the task accepts.

    microdistill extract --task reddit-comment --corpus comments.csv --field body ...

Formats: `.txt` (one input per non-empty line), `.jsonl` (a field of each object), `.csv`
(a column), `.parquet` (a column) and a Hugging Face `datasets` folder written by
`save_to_disk` (a column of the "train" split, or of the only split).

`filter_inputs` applies the task's input rules in a fixed order — strip patterns, reject
patterns, token length in the teacher's tokenizer, de-duplication — and counts what each
rule dropped, so a run can say why 10,000 lines became 6,000 examples.
"""

from __future__ import annotations

import csv
import hashlib
import json
import re
import unicodedata
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

from microdistill.core.errors import UserError
from microdistill.core.task import Task

FORMATS = ".txt, .jsonl, .csv, .parquet or a Hugging Face datasets folder"
_DATASET_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")


class CorpusError(UserError):
    """A corpus that cannot be read or yields no usable input; one line for the user."""


def normalise(text: str) -> str:
    """The form two inputs must share to count as duplicates (and to share a split)."""
    return re.sub(r"\s+", " ", unicodedata.normalize("NFKC", text)).strip().casefold()


def example_id(text: str) -> str:
    """An input's identity: duplicates share it, and the held-out split is drawn from it."""
    return hashlib.sha256(normalise(text).encode()).hexdigest()[:16]


@dataclass
class Item:
    """One input text, with the human labels the corpus holds for it (task field -> value)."""

    text: str
    labels: dict[str, str] | None = None


# ---- reading -------------------------------------------------------------------------------
def read_corpus(path: str | Path, field: str = "text", labels: dict[str, str] | None = None) -> list[Item]:
    """All inputs of a corpus file or folder, in file order.

    Args:
        field: the JSON key / column holding the input text (ignored for `.txt`).
        labels: task field name -> corpus column holding a human label for it, e.g.
            `{"toxicity": "label"}`; values are kept as strings (`1` -> `"1"`).
    """
    path = Path(path)
    labels = dict(labels or {})
    if not path.exists():
        raise CorpusError(f"corpus {path}: not found")
    if path.is_dir():
        if not any((path / m).is_file() for m in _DATASET_MARKERS):
            raise CorpusError(f"corpus {path}: a folder but not a saved datasets folder (expected {FORMATS})")
        rows = _dataset_rows(path, [field, *labels.values()])
    else:
        suffix = path.suffix.lower()
        if suffix == ".txt":
            if labels:
                raise CorpusError(f"corpus {path}: a .txt file has no label columns; use .jsonl, .csv or .parquet")
            rows = ({field: line} for line in _lines(path))
        elif suffix in (".jsonl", ".ndjson"):
            rows = _jsonl_rows(path)
        elif suffix == ".csv":
            rows = _csv_rows(path)
        elif suffix == ".parquet":
            rows = _parquet_rows(path, [field, *labels.values()])
        else:
            raise CorpusError(f"corpus {path}: unknown format {suffix or '(no suffix)'!r} (expected {FORMATS})")
    items = [_item(row, field, labels, path, i) for i, row in enumerate(rows, 1)]
    if not items:
        raise CorpusError(f"corpus {path}: empty corpus")
    return items


def _item(row: dict[str, Any], field: str, labels: dict[str, str], path: Path, n: int) -> Item:
    for column in (field, *labels.values()):
        if column not in row:
            available = ", ".join(map(str, row)) or "none"
            raise CorpusError(f"corpus {path} row {n}: no field {column!r} (available: {available})")
    text = row[field]
    item_labels = {name: str(row[col]) for name, col in labels.items() if row[col] is not None}
    return Item(text="" if text is None else str(text), labels=item_labels or None)


def _lines(path: Path) -> Iterator[str]:
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    yield line.rstrip("\r\n")
    except UnicodeDecodeError as e:
        raise CorpusError(f"corpus {path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def _jsonl_rows(path: Path) -> Iterator[dict[str, Any]]:
    for n, line in enumerate(_lines(path), 1):
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise CorpusError(f"corpus {path}: record {n} is not valid JSON ({e.msg})") from None
        if not isinstance(obj, dict):
            raise CorpusError(f"corpus {path}: record {n} is not a JSON object")
        yield obj


def _csv_rows(path: Path) -> Iterator[dict[str, Any]]:
    try:
        with open(path, encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f)
            for row in reader:
                # DictReader files surplus cells under None; they are not a column anyone can name
                row.pop(None, None)
                yield row
    except UnicodeDecodeError as e:
        raise CorpusError(f"corpus {path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except csv.Error as e:
        raise CorpusError(f"corpus {path}: malformed CSV ({e})") from None


def _check_columns(path: Path, have: list[str], want: list[str]) -> None:
    for column in want:
        if column not in have:
            raise CorpusError(f"corpus {path}: no column {column!r} (available: {', '.join(have) or 'none'})")


def _parquet_rows(path: Path, columns: list[str]) -> Iterator[dict[str, Any]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(path)
        _check_columns(path, schema.names, columns)
        table = pq.read_table(path, columns=list(dict.fromkeys(columns)))
    except (pa.ArrowInvalid, OSError) as e:
        raise CorpusError(f"corpus {path}: unreadable parquet ({str(e).splitlines()[0]})") from None
    return iter(table.to_pylist())


def _dataset_rows(path: Path, columns: list[str]) -> Iterator[dict[str, Any]]:
    try:
        import datasets
    except ImportError:
        raise CorpusError(f"corpus {path}: reading a datasets folder needs `pip install datasets`") from None
    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:  # datasets raises FileNotFoundError, ValueError, arrow errors...
        raise CorpusError(f"corpus {path}: unreadable datasets folder ({type(e).__name__})") from None
    if isinstance(ds, datasets.DatasetDict):
        if "train" in ds:
            ds = ds["train"]
        elif len(ds) == 1:
            ds = next(iter(ds.values()))
        else:
            raise CorpusError(f"corpus {path}: several splits ({', '.join(ds)}) and none is 'train'")
    _check_columns(path, list(ds.column_names), columns)
    return iter(ds.select_columns(list(dict.fromkeys(columns))))


# ---- filtering -----------------------------------------------------------------------------
@dataclass
class FilterReport:
    """How many inputs each rule dropped, in the order the rules run."""

    read: int = 0
    empty_after_strip: int = 0
    rejected: dict[str, int] = field(default_factory=dict)  # reject pattern -> inputs it dropped
    too_short: int = 0
    too_long: int = 0
    duplicate: int = 0
    kept: int = 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def dropped(self) -> str:
        parts = [f"empty_after_strip={self.empty_after_strip}", f"rejected={sum(self.rejected.values())}"]
        parts += [f"too_short={self.too_short}", f"too_long={self.too_long}", f"duplicate={self.duplicate}"]
        return ", ".join(parts)

    def summary(self) -> str:
        return f"kept {self.kept} of {self.read} inputs (dropped: {self.dropped()})"


def read_lines(path: Path) -> list[str]:
    """The non-empty lines of a text file, or of stdin when `path` is '-' (inputs to label)."""
    import sys

    stdin = str(path) == "-"
    if not stdin and not Path(path).is_file():
        raise CorpusError(f"input file {path}: not found")
    data = sys.stdin.buffer.read() if stdin else Path(path).read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CorpusError(f"input {'from stdin' if stdin else f'file {path}'}: not UTF-8 text (byte "
                          f"0x{data[e.start]:02x} at offset {e.start}); convert it to UTF-8") from None
    return [line for line in text.splitlines() if line.strip()]


def clean(text: str, strip: Iterable[re.Pattern]) -> str:
    """`text` with every strip pattern removed and runs of whitespace collapsed to one space."""
    for pattern in strip:
        text = pattern.sub(" ", text)
    return " ".join(text.split())


def by_length(lengths: Sequence[int], size: int) -> Iterator[list[int]]:
    """Indices of inputs with these lengths in batches of `size`, shortest first, so each batch
    padded to its own longest row holds little padding."""
    if size < 1:
        raise ValueError(f"batch_size must be at least 1, got {size}")
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    for start in range(0, len(order), size):
        yield order[start:start + size]


def clean_inputs(task: Task, texts: Iterable[str]) -> list[str]:
    """Texts cleaned as the corpus was (the task's strip patterns, collapsed whitespace)."""
    strip = [re.compile(p) for p in task.inputs.strip]
    return [clean(t, strip) for t in texts]


def filter_inputs(items: list[Item], task: Task, tokenizer, source: str = "corpus") -> tuple[list[Item], FilterReport]:
    """The items the task accepts (texts cleaned, first of duplicates kept) and the drop counts.

    Length is counted in the teacher's tokens without special tokens, as the student will see
    the input. Raises CorpusError if nothing is left.
    """
    rules = task.inputs
    strip = [re.compile(p) for p in rules.strip]
    reject = [(p, re.compile(p)) for p in rules.reject]
    report = FilterReport(read=len(items), rejected={p: 0 for p in rules.reject})
    candidates: list[Item] = []
    for item in items:
        text = clean(item.text, strip)
        if not text:
            report.empty_after_strip += 1
            continue
        hit = next((p for p, rx in reject if rx.search(text)), None)
        if hit is not None:
            report.rejected[hit] += 1
            continue
        candidates.append(Item(text=text, labels=item.labels))
    # one batched call: fast tokenizers encode a list in parallel Rust code
    encoded = tokenizer([c.text for c in candidates], add_special_tokens=False).input_ids if candidates else []
    lengths = [len(ids) for ids in encoded]
    kept: list[Item] = []
    seen: set[str] = set()
    for item, n in zip(candidates, lengths):
        if n < rules.min_tokens:
            report.too_short += 1
        elif n > rules.max_tokens:
            report.too_long += 1
        elif rules.dedupe and normalise(item.text) in seen:
            report.duplicate += 1
        else:
            seen.add(normalise(item.text))
            kept.append(item)
    report.kept = len(kept)
    if not kept:
        raise CorpusError(f"all {report.read} inputs from {source} were filtered out: {report.dropped()}")
    return kept, report
