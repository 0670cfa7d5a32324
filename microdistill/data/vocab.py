"""Vocabularies: the few hundred teacher tokens the student reads and says.

Output side. The teacher has 150k-260k tokens but a task's outputs use a handful. The kept
vocabulary is
  * required  — every token a valid output can use: the canonical tokenization of valid
    outputs and of the task's fragments, plus a token spelling each character of the output
    alphabet (so constrained decoding inside the kept set can always go on character by
    character), plus EOS;
  * auxiliary — the tokens that carry the most teacher probability at output steps,
    measured on a calibration sample, up to a fixed size (512 by default).
`coverage` reports how much teacher mass the kept set holds.

Input side. The student's input vocabulary is the tokens the corpus uses, the 256 byte tokens
and the specials. `InputEncoder` replaces any other token by its bytes, so an unseen word,
emoji or accent still encodes and decodes back to the same text.

`tokenizer_from_json` builds a pretrained encoder's WordPiece tokenizer (a heads student's, and
its export's) from its tokenizer.json.

Byte tokens come in two styles: byte-level BPE (GPT-2's printable alphabet for the 256
bytes, as in Qwen) and SentencePiece byte fallback (`<0x00>`..`<0xFF>`, as in Gemma).
"""

from __future__ import annotations

import itertools
import json
import math
import weakref
from functools import lru_cache
from typing import Any, Iterable, Sequence

import numpy as np

from microdistill.core.task import EnumField, NumberField, StringField, Task

MAX_COMBINATIONS = 4096
SP_SPACE = "\u2581"  # SentencePiece's visible space '▁'


# ---- bytes <-> tokens ----------------------------------------------------------------------
@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's map from each byte to a printable character (byte-level BPE token alphabet)."""
    # printable bytes stand for themselves; the rest are shifted past 255 so none is blank
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


class _ByteCodec:
    """How one tokenizer spells bytes: its 256 byte-token ids and the inverse map."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.vocab: dict[str, int] = tokenizer.get_vocab()
        sp = [self.vocab.get(f"<0x{b:02X}>") for b in range(256)]
        b2u = bytes_to_unicode()
        bl = [self.vocab.get(b2u[b]) for b in range(256)]
        if all(i is not None for i in sp):
            self.style, self.byte_ids = "sentencepiece", sp
        elif all(i is not None for i in bl):
            self.style, self.byte_ids = "byte-level", bl
        else:
            raise ValueError(
                f"{type(tokenizer).__name__}: has neither byte-level BPE tokens nor <0xNN> byte-fallback "
                "tokens, so unseen text cannot be encoded"
            )
        self.u2b = {u: b for b, u in b2u.items()}

    def piece(self, data: bytes) -> str | None:
        """The token string that would spell exactly `data`, if the text is valid UTF-8."""
        if self.style == "byte-level":
            return "".join(bytes_to_unicode()[b] for b in data)
        try:
            return data.decode("utf-8").replace(" ", SP_SPACE)
        except UnicodeDecodeError:
            return None

    def token_bytes(self, token_id: int) -> bytes:
        token = self.tok.convert_ids_to_tokens(int(token_id))
        if self.style == "sentencepiece":
            if len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
                return bytes([int(token[3:5], 16)])
            return token.replace(SP_SPACE, " ").encode("utf-8")
        # added tokens (specials) may hold characters outside the byte alphabet: spell them as text
        return b"".join(bytes([self.u2b[c]]) if c in self.u2b else c.encode("utf-8") for c in token)


_CODECS: "weakref.WeakKeyDictionary[Any, _ByteCodec]" = weakref.WeakKeyDictionary()


def _codec(tokenizer) -> _ByteCodec:
    # get_vocab() of a 262k-token tokenizer takes ~0.2 s; build the maps once per tokenizer
    codec = _CODECS.get(tokenizer)
    if codec is None:
        codec = _CODECS[tokenizer] = _ByteCodec(tokenizer)
    return codec


def byte_tokens(tokenizer) -> list[int]:
    """The 256 token ids spelling bytes 0..255; ValueError if the tokenizer has no byte tokens."""
    return list(_codec(tokenizer).byte_ids)


def token_bytes(tokenizer, token_id: int) -> bytes:
    """The bytes a token stands for (SentencePiece '▁' is a space; `<0xNN>` is byte NN)."""
    return _codec(tokenizer).token_bytes(token_id)


def spelling_tokens(tokenizer, char: str) -> list[int]:
    """The single token that spells `char`, or else the byte tokens of its UTF-8 bytes."""
    codec = _codec(tokenizer)
    data = char.encode("utf-8")
    single = codec.vocab.get(codec.piece(data) or "")
    return [single] if single is not None else [codec.byte_ids[b] for b in data]


# ---- output vocabulary ---------------------------------------------------------------------
def _example_values(f: Any) -> list[Any]:
    """A few values of a free field, enough to meet the tokens its outputs typically use."""
    if isinstance(f, EnumField):
        return list(f.values)
    if isinstance(f, StringField):
        words = ["a", "ok", "double charge", "app crashes on start", "Yes", "no", "unknown"]
        return [w[: f.max_length] for w in words]
    assert isinstance(f, NumberField)
    values: list[float] = [0, 1, 2, 5, 10, 42, 100, 1000, -1, -7, 0.5, 3.14, 12.75]
    values += [v for v in (f.minimum, f.maximum) if v is not None]
    if f.type == "integer":
        values = [int(v) for v in values if float(v).is_integer()]
    lo = -math.inf if f.minimum is None else f.minimum
    hi = math.inf if f.maximum is None else f.maximum
    return list(dict.fromkeys(v for v in values if lo <= v <= hi)) or [f.minimum]


def example_outputs(task: Task) -> list[str]:
    """Canonical texts of valid outputs: every combination of the fields' values when there
    are at most MAX_COMBINATIONS, otherwise each value substituted into one base output."""
    choices = [_example_values(f) for f in task.output.fields]
    names = task.field_names
    if math.prod(len(c) for c in choices) <= MAX_COMBINATIONS:
        combos = [dict(zip(names, values)) for values in itertools.product(*choices)]
    else:
        base = {n: c[0] for n, c in zip(names, choices)}
        combos = [{**base, n: v} for n, c in zip(names, choices) for v in c]
    combos += [ex.output for ex in task.prompt.examples]
    return list(dict.fromkeys(task.serialize(c) for c in combos))


def required_tokens(task: Task, tokenizer, eos_id: int) -> list[int]:
    """Sorted ids of every token a valid output can use, EOS included.

    (a) the canonical tokenization of example outputs and of `task.fragments()`;
    (b) a spelling of each character in `task.output_alphabet()` — a single token, or its
        byte tokens — so a grammar limited to the kept set never reaches a dead end;
    (c) `eos_id`.
    """
    texts = example_outputs(task) + task.fragments()
    ids: set[int] = {int(eos_id)}
    for encoded in tokenizer(texts, add_special_tokens=False).input_ids:
        ids.update(encoded)
    for char in task.output_alphabet():
        ids.update(spelling_tokens(tokenizer, char))
    return sorted(ids)


def select_kept(required: Sequence[int], mass: np.ndarray, size: int = 512) -> list[int]:
    """Kept output vocabulary: `required` first (in their order), then the highest-mass others.

    Args:
        mass: float [V] mean teacher probability of each token at output steps.
    If `required` alone holds `size` ids or more, all of them are kept and nothing is added:
    dropping a required token could make a valid output impossible to say. Ids with no mass
    (padding rows of the logit matrix, tokens never predicted) are never added.
    """
    kept = list(dict.fromkeys(int(i) for i in required))
    if len(kept) >= size:
        return kept
    taken = set(kept)
    mass = np.asarray(mass, dtype=np.float64)
    # stable sort: equal masses keep id order, so the selection is deterministic
    for i in np.argsort(-mass, kind="stable"):
        if len(kept) >= size or mass[i] <= 0:
            break
        if int(i) not in taken:
            kept.append(int(i))
    return kept


def coverage(kept: Sequence[int], mass: np.ndarray) -> float:
    """Fraction of the total teacher mass (float [V]) that lies on the kept ids."""
    mass = np.asarray(mass, dtype=np.float64)
    total = mass.sum()
    return float(mass[np.asarray(list(kept), dtype=np.int64)].sum() / total) if total > 0 else 0.0


def kept_token_strings(tokenizer, kept: Sequence[int]) -> list[str]:
    """Readable text of each kept token (for the manifest and reports)."""
    return [token_bytes(tokenizer, i).decode("utf-8", errors="backslashreplace") for i in kept]


# ---- input vocabulary ----------------------------------------------------------------------
def special_ids(tokenizer) -> list[int]:
    ids = (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.unk_token_id)
    return [int(i) for i in ids if i is not None]


def build_input_vocab(tokenizer, id_lists: Iterable[Sequence[int]]) -> list[int]:
    """Sorted teacher ids the student reads: those used, the 256 byte tokens, the specials."""
    ids = set(byte_tokens(tokenizer)) | set(special_ids(tokenizer))
    for seq in id_lists:
        ids.update(int(i) for i in seq)
    return sorted(ids)


class InputEncoder:
    """Teacher tokenization limited to an input vocabulary, with byte fallback.

    A token outside `input_vocab` is replaced by the byte tokens of its bytes, so that
    `tokenizer.decode(encode(text)) == text` for any text.
    """

    def __init__(self, tokenizer, input_vocab: Sequence[int]):
        self.tokenizer = tokenizer
        self.vocab = frozenset(int(i) for i in input_vocab)
        self.codec = _codec(tokenizer)
        missing = [i for i in self.codec.byte_ids if i not in self.vocab]
        if missing:
            raise ValueError(f"input vocabulary lacks {len(missing)} of the 256 byte tokens (use build_input_vocab)")
        self._fallback: dict[int, list[int]] = {}

    def _bytes_of(self, token_id: int) -> list[int]:
        if token_id not in self._fallback:
            self._fallback[token_id] = [self.codec.byte_ids[b] for b in self.codec.token_bytes(token_id)]
        return self._fallback[token_id]

    def encode(self, text: str) -> list[int]:
        """Teacher token ids of `text`, all inside the input vocabulary."""
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        out: list[int] = []
        for i in ids:
            if i in self.vocab:
                out.append(i)
            else:
                out.extend(self._bytes_of(i))
        return out

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]


def tokenizer_from_json(tok: dict[str, Any]):
    """A `tokenizers.Tokenizer` from a tokenizer.json dict, without padding or truncation
    (callers pad their own batches)."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_str(json.dumps(tok))
    tokenizer.no_padding()
    tokenizer.no_truncation()
    return tokenizer
