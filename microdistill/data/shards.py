"""Shards: the on-disk teacher signal that every student trains on.

    microdistill inspect runs/default/shards

A shard folder holds `manifest.json`, `tokenizer/` (the teacher's tokenizer files, so students
need no teacher) and `shard-NNNNN.safetensors` files of up to 128 examples each. Per example:

    input_ids    int32 [n_in]            teacher token ids of the input text (no prompt)
    output_ids   int32 [n_out]           teacher token ids the teacher chose, ending with EOS
    logits       float16 [n_out, K]      raw teacher logits over the kept vocabulary
    lse          float32 [n_out]         log-sum-exp of the logits over the FULL vocabulary
    decisions    float32 [n_values]      per enum field: P(value), normalised over the values
    hidden       float16 [D_teacher]     the teacher's hidden state at one layer (manifest
                                         `hidden_layer`), averaged over the input's prompt tokens
    text, output_text, fields, split, labels   (JSON in the safetensors header)

`input_embeddings.safetensors` (manifest key `input_embeddings`), when present, holds one
float16 tensor `rows` [n_input, D_teacher], one teacher vector per id of `manifest.vocab.input`,
in that order, from which a student can start its own input table: for the ids the corpus uses,
the teacher's middle-layer state averaged over the id's occurrences; for the others, the
teacher's input embedding row. It is written for a student kind that reads it (a decoder), at
extraction or at that student's first training (extract/embeddings.py).

A folder extracted by N workers (parts.py) has `parts: N` in its manifest and, beside the
calibration answers in its own shards, `parts/I-of-N/` folders with their own manifest and
shards; ShardSet reads them all as one folder (with_parts).

Ragged arrays are stored concatenated with offsets. Text-only shards (sequence-level KD from a
black-box teacher) omit `logits` and `lse`. Every file is written to a temporary name and
renamed, and the manifest is rewritten after each shard. The records of the shard being filled
are kept in `journal.safetensors` after every batch, and taken back when the folder is opened
again: a crash loses at most the batch being labelled, never a labelled one.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

# safetensors is imported where it is used: the command line imports this module (through the option
# classes its flags come from) in the runtime-only install too, which leaves safetensors out.
from microdistill.data.corpus import example_id
from microdistill.core.errors import UserError
from microdistill.core.files import atomic_write_bytes, atomic_write_json, read_format

FORMAT = "microdistill.shards/1"
INPUT_EMBEDDINGS = "input_embeddings.safetensors"
SHARD_SIZE = 128
JOURNAL = "journal.safetensors"  # the records of the shard being filled: a kill loses only what was in flight
VAL_FRACTION = 0.1


class StoreError(UserError):
    """A shard folder that cannot be read or written; the message is one line for the user."""


@dataclass
class Record:
    text: str
    input_ids: np.ndarray
    output_ids: np.ndarray
    output_text: str
    fields: dict[str, Any]
    logits: np.ndarray | None = None
    lse: np.ndarray | None = None
    decisions: dict[str, np.ndarray] = field(default_factory=dict)
    labels: dict[str, Any] | None = None
    hidden: np.ndarray | None = None
    id: str = ""
    split: str = ""

    def __post_init__(self) -> None:
        self.id = self.id or example_id(self.text)
        self.split = self.split or split_of(self.id)
        self.input_ids = np.asarray(self.input_ids, dtype=np.int32)
        self.output_ids = np.asarray(self.output_ids, dtype=np.int32)
        if self.logits is not None:
            self.logits = np.asarray(self.logits, dtype=np.float16)
            self.lse = np.asarray(self.lse, dtype=np.float32)
            if self.logits.shape[0] != len(self.output_ids) or self.lse.shape != (len(self.output_ids),):
                raise ValueError(f"example {self.id}: logits/lse rows must match the {len(self.output_ids)} output tokens")
        if self.hidden is not None:
            self.hidden = np.asarray(self.hidden, dtype=np.float16)


def split_of(eid: str, val_fraction: float = VAL_FRACTION) -> str:
    """Held-out split by hash, so the same input lands in the same split in every run."""
    return "val" if int(eid[:8], 16) < val_fraction * 2**32 else "train"


def _ragged(arrays: list[np.ndarray], dtype) -> tuple[np.ndarray, np.ndarray]:
    offsets = np.zeros(len(arrays) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(a) for a in arrays])
    flat = np.concatenate(arrays).astype(dtype) if arrays else np.zeros(0, dtype)
    return flat, offsets


def encode_shard(records: list[Record]) -> bytes:
    from safetensors.numpy import save as st_save

    tensors: dict[str, np.ndarray] = {}
    tensors["input_ids"], tensors["input_offsets"] = _ragged([r.input_ids for r in records], np.int32)
    tensors["output_ids"], tensors["output_offsets"] = _ragged([r.output_ids for r in records], np.int32)
    with_logits = [r.logits is not None for r in records]
    if any(with_logits):
        if not all(with_logits):
            raise ValueError("a shard holds either logits for every example or for none")
        tensors["logits"] = np.concatenate([r.logits for r in records]).astype(np.float16)
        tensors["lse"] = np.concatenate([r.lse for r in records]).astype(np.float32)
    with_hidden = [r.hidden is not None for r in records]
    if any(with_hidden):
        if not all(with_hidden):
            raise ValueError("a shard holds either hidden states for every example or for none")
        tensors["hidden"] = np.stack([r.hidden for r in records]).astype(np.float16)
    for name in records[0].decisions if records else []:
        tensors[f"decisions.{name}"] = np.stack([r.decisions[name] for r in records]).astype(np.float32)
    meta = [
        {"id": r.id, "split": r.split, "text": r.text, "output_text": r.output_text, "fields": r.fields, "labels": r.labels}
        for r in records
    ]
    return st_save(tensors, metadata={"format": FORMAT, "examples": json.dumps(meta, ensure_ascii=False)})


def decode_shard(data: bytes, path: Path) -> list[Record]:
    from safetensors.numpy import load as st_load  # outside the try: a missing package is no damaged shard

    try:
        t = st_load(data)
        examples = json.loads(header_metadata(data)["examples"])
    except Exception as e:  # safetensors raises several types for damaged files
        raise StoreError(f"shard {path}: corrupted or not a microdistill shard ({type(e).__name__})") from None
    io, oo = t["input_offsets"], t["output_offsets"]
    dec_names = [k.split(".", 1)[1] for k in t if k.startswith("decisions.")]
    out = []
    for i, m in enumerate(examples):
        a, b = int(oo[i]), int(oo[i + 1])
        out.append(Record(
            text=m["text"], input_ids=t["input_ids"][io[i] : io[i + 1]], output_ids=t["output_ids"][a:b],
            output_text=m["output_text"], fields=m["fields"], logits=t["logits"][a:b] if "logits" in t else None,
            lse=t["lse"][a:b] if "lse" in t else None, decisions={n: t[f"decisions.{n}"][i] for n in dec_names},
            labels=m.get("labels"), hidden=t["hidden"][i] if "hidden" in t else None, id=m["id"], split=m["split"],
        ))
    return out


def header_metadata(data: bytes) -> dict[str, str]:
    """The safetensors header metadata of an in-memory shard; ValueError when not a shard."""
    meta = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")]).get("__metadata__", {})
    if meta.get("format") != FORMAT:
        raise ValueError("wrong format tag")
    return meta


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def rows_sha256(rows) -> str:
    """The checksum an input embedding file keeps of its rows (a torch tensor), in its metadata."""
    return _sha256(rows.contiguous().numpy().tobytes())


def read_manifest(folder: Path) -> dict[str, Any]:
    """The manifest.json of a shard folder (or of one part of it), as written."""
    mpath = folder / "manifest.json"
    if not folder.is_dir():
        raise StoreError(f"shard folder {folder}: not found")
    if not mpath.is_file():
        raise StoreError(f"shard folder {folder}: no manifest.json (not a microdistill shard folder)")
    return read_format(mpath, FORMAT, "manifest", StoreError)


def part_dir(root: Path, i: int, n: int) -> Path:
    """Where worker i of n writes its part of the shard folder `root`."""
    return Path(root) / "parts" / f"{i}-of-{n}"


def with_parts(root: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """The manifest of a folder extracted in parts, as one: the root's shards (the calibration
    answers) then each part's, their files named from the root; complete when every part is."""
    shards, n, complete = list(manifest["shards"]), manifest["parts"], manifest.get("complete", False)
    for i in range(n):
        folder = part_dir(root, i, n)
        if not (folder / "manifest.json").is_file():
            complete = False
            continue
        part = read_manifest(folder)
        if part.get("calibration_id") != manifest.get("calibration_id") or part.get("part") != [i, n]:
            raise StoreError(f"{folder}: not part {i} of {n} of this folder's calibration (copied from another "
                             f"extraction?); delete it and run worker {i} again")
        shards += [{**s, "file": f"{folder.relative_to(root)}/{s['file']}"} for s in part["shards"]]
        complete = complete and part.get("complete", False)
    n_val = sum(s["n_val"] for s in shards)
    counts = {"examples": sum(s["n"] for s in shards), "val": n_val}
    return {**manifest, "shards": shards, "complete": complete,
            "counts": {**counts, "train": counts["examples"] - n_val}}


class ShardWriter:
    """Appends examples to a shard folder; re-opening the folder resumes it.

    `header` is everything fixed for the folder (task, teacher, vocabulary, ...). Re-opening
    a folder whose header disagrees on the keys in `must_match` is refused: shards from two
    teachers or tasks must never be mixed.
    """

    must_match = ("format", "task_fingerprint", "teacher", "vocab", "signal", "part", "calibration_id")

    def __init__(self, out_dir: Path, header: dict[str, Any], shard_size: int = SHARD_SIZE):
        self.dir = Path(out_dir)
        self.shard_size = shard_size
        self.dir.mkdir(parents=True, exist_ok=True)
        header = {**header, "format": FORMAT}
        path = self.dir / "manifest.json"
        if path.exists():
            self.manifest = read_manifest(self.dir)
            for key in self.must_match:
                if self.manifest.get(key) != header.get(key):
                    raise StoreError(
                        f"{self.dir} holds shards made with a different {key.replace('_', ' ')}; "
                        "use another --out folder or delete this one"
                    )
            self.manifest.update({k: v for k, v in header.items() if k not in self.manifest})
        else:
            self.manifest = {**header, "shards": [], "complete": False, "created": time.time()}
        self.done_ids = ShardSet.ids_in(self.dir, self.manifest)
        self.buffer: list[Record] = []
        journal = self.dir / JOURNAL
        if journal.is_file():  # a run killed while filling a shard: take its records back
            for record in decode_shard(journal.read_bytes(), journal):
                self.add(record)

    @property
    def n_done(self) -> int:
        return sum(s["n"] for s in self.manifest["shards"])

    def add(self, record: Record) -> None:
        if record.id in self.done_ids:
            return
        self.done_ids.add(record.id)
        self.buffer.append(record)
        if len(self.buffer) >= self.shard_size:
            self.flush()

    def flush(self) -> None:
        if not self.buffer:
            return
        data = encode_shard(self.buffer)
        name = f"shard-{len(self.manifest['shards']):05d}.safetensors"
        atomic_write_bytes(self.dir / name, data)
        splits = [r.split for r in self.buffer]
        self.manifest["shards"].append(
            {"file": name, "n": len(self.buffer), "n_val": splits.count("val"), "bytes": len(data), "sha256": _sha256(data)}
        )
        self.buffer = []
        self.manifest["complete"] = False
        self.save_manifest()
        (self.dir / JOURNAL).unlink(missing_ok=True)  # after the manifest: its records are in a shard now

    def journal(self) -> None:
        """Keep the records of the shard being filled on disk, so that a run killed now resumes
        with them (called after each batch; the shard itself is still written whole)."""
        if self.buffer:
            atomic_write_bytes(self.dir / JOURNAL, encode_shard(self.buffer))

    def update(self, **fields: Any) -> None:
        self.manifest.update(fields)
        self.save_manifest()

    def save_manifest(self) -> None:
        shards = self.manifest["shards"]
        n = sum(s["n"] for s in shards)
        n_val = sum(s["n_val"] for s in shards)
        self.manifest["counts"] = {**self.manifest.get("counts", {}), "examples": n, "train": n - n_val, "val": n_val}
        atomic_write_json(self.dir / "manifest.json", self.manifest)

    def close(self, **fields: Any) -> None:
        """Write the last, possibly short, shard and mark the folder complete."""
        self.flush()
        self.manifest["complete"] = True
        self.update(**fields)


class ShardSet:
    """Read access to a shard folder, checked against its manifest."""

    def __init__(self, path: Path, verify: bool = True):
        self.dir = Path(path)
        self.manifest = read_manifest(self.dir)
        if "part" in self.manifest:
            i, n = self.manifest["part"]
            raise StoreError(f"{self.dir} is part {i} of {n} of the shard folder {self.dir.parent.parent}; use that folder")
        if self.manifest.get("parts"):
            self.manifest = with_parts(self.dir, self.manifest)
        for s in self.manifest["shards"]:
            p = self.dir / s["file"]
            if not p.is_file():
                raise StoreError(f"shard {p}: listed in the manifest but missing")
            if p.stat().st_size != s["bytes"]:
                raise StoreError(f"shard {p}: {p.stat().st_size} bytes, manifest says {s['bytes']} (corrupted)")
        self.verify = verify

    @staticmethod
    def ids_in(path: Path, manifest: dict) -> set[str]:
        from safetensors import safe_open

        ids: set[str] = set()
        for s in manifest["shards"]:
            with safe_open(str(Path(path) / s["file"]), "np") as f:
                ids.update(e["id"] for e in json.loads(f.metadata()["examples"]))
        return ids

    def __len__(self) -> int:
        return sum(s["n"] for s in self.manifest["shards"])

    @property
    def has_logits(self) -> bool:
        return self.manifest.get("signal", "logits") == "logits"

    @property
    def hidden_layer(self) -> int | None:
        """The teacher layer whose input-averaged hidden state every example holds, or None."""
        return self.manifest.get("hidden_layer")

    @property
    def kept_vocab(self) -> np.ndarray:
        """Teacher token id of each student output index."""
        return np.asarray(self.manifest["vocab"]["kept"], dtype=np.int64)

    @property
    def input_vocab(self) -> np.ndarray:
        """Teacher token id of each student input index."""
        return np.asarray(self.manifest["vocab"]["input"], dtype=np.int64)

    @property
    def eos_id(self) -> int:
        return int(self.manifest["vocab"]["eos"])

    def input_embeddings(self):
        """The teacher's vectors of the ids of `input_vocab`, float32 torch [n_input, D_teacher],
        or None when the folder has none (text-only shards, or written before they were stored)."""
        path = self.dir / self.manifest.get("input_embeddings", INPUT_EMBEDDINGS)
        if not path.is_file():
            return None
        from safetensors import safe_open
        from safetensors.torch import load

        try:
            rows = load(path.read_bytes())["rows"]
            with safe_open(path, "pt") as f:
                stored = (f.metadata() or {}).get("sha256")  # older files hold none
        except Exception as e:  # safetensors raises several types for damaged files
            raise StoreError(f"{path}: corrupted or not an input embedding file ({type(e).__name__})") from None
        n = len(self.manifest["vocab"]["input"])
        if rows.dim() != 2 or rows.shape[0] != n:
            raise StoreError(f"{path}: {tuple(rows.shape)} rows, expected one per input token ({n}); extract again")
        if (stored is not None and rows_sha256(rows) != stored) or not bool(rows.isfinite().all()):
            raise StoreError(f"{path}: damaged (its rows fail their checksum or are not finite); delete it, and "
                             "extract again with --embeddings or let the decoder's training compute it")
        return rows.float()

    def task(self):
        from microdistill.core.task import task_from_dict

        return task_from_dict(self.manifest["task"], f"in {self.dir / 'manifest.json'}")

    def tokenizer(self):
        from transformers import AutoTokenizer

        path = self.dir / "tokenizer"
        if not path.is_dir():
            raise StoreError(f"shard folder {self.dir}: tokenizer/ is missing")
        return AutoTokenizer.from_pretrained(str(path))

    def shard_records(self, s: dict) -> list[Record]:
        p = self.dir / s["file"]
        data = p.read_bytes()
        if self.verify and _sha256(data) != s["sha256"]:
            raise StoreError(f"shard {p}: checksum mismatch (corrupted); extract it again (delete the folder, or "
                             "restore the file)")
        return decode_shard(data, p)

    def records(self, split: str | None = None) -> Iterator[Record]:
        for s in self.manifest["shards"]:
            for r in self.shard_records(s):
                if split is None or r.split == split:
                    yield r

    def load(self, split: str | None = None) -> list[Record]:
        out = list(self.records(split))
        if not out:
            what = f"{split} examples" if split else "examples"
            raise StoreError(f"shard folder {self.dir}: no {what}")
        return out
