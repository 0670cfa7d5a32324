"""vocab.py: required tokens, kept-set selection, byte tokens of both styles, input encoding."""

from __future__ import annotations

import itertools
import random

import numpy as np
import pytest
import torch

from microdistill.data import vocab
from microdistill.core.grammar import Grammar
from microdistill.core.task import load_task, task_from_dict

UNSEEN = [
    "zebra quixotic juxtaposition",
    "naïve café in Zürich — déjà vu",
    "emoji 😀🎉 and CJK 漢字 mixed",
    "  leading and trailing spaces  ",
    "tabs\tand\nnewlines\r\n",
]


@pytest.fixture(scope="module")
def sp_tokenizer():
    """A tiny SentencePiece-style tokenizer: '▁' for spaces and <0xNN> byte fallback (as Gemma)."""
    from tokenizers import Tokenizer, decoders, models, normalizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<eos>", "<bos>", "<unk>"]
    pieces = specials + [f"<0x{b:02X}>" for b in range(256)] + ["▁"] + list("abcdefghijklmnopqrstuvwxyz")
    merges = [("▁", "t"), ("h", "e"), ("▁t", "he"), ("o", "n"), ("▁", "on"), ("▁on", "e")]
    pieces += ["▁t", "he", "▁the", "on", "▁on", "▁one"]
    model = models.BPE(vocab={p: i for i, p in enumerate(pieces)}, merges=merges, byte_fallback=True, unk_token="<unk>")
    tok = Tokenizer(model)
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>", unk_token="<unk>"
    )


# ---- byte tokens ---------------------------------------------------------------------------
def test_byte_level_byte_tokens_round_trip(tiny_tokenizer):
    ids = vocab.byte_tokens(tiny_tokenizer)
    assert len(ids) == len(set(ids)) == 256
    assert [vocab.token_bytes(tiny_tokenizer, i) for i in ids] == [bytes([b]) for b in range(256)]
    space = tiny_tokenizer.encode(" wor", add_special_tokens=False)
    assert b"".join(vocab.token_bytes(tiny_tokenizer, i) for i in space) == b" wor"
    assert vocab.token_bytes(tiny_tokenizer, tiny_tokenizer.eos_token_id) == b"<|im_end|>"


def test_sentencepiece_byte_fallback(sp_tokenizer):
    ids = vocab.byte_tokens(sp_tokenizer)
    assert sp_tokenizer.convert_ids_to_tokens(ids[:2] + ids[-1:]) == ["<0x00>", "<0x01>", "<0xFF>"]
    assert [vocab.token_bytes(sp_tokenizer, i) for i in ids] == [bytes([b]) for b in range(256)]
    the = sp_tokenizer.convert_tokens_to_ids("▁the")
    assert vocab.token_bytes(sp_tokenizer, the) == b" the"
    assert vocab.spelling_tokens(sp_tokenizer, " ") == [sp_tokenizer.convert_tokens_to_ids("▁")]
    assert vocab.spelling_tokens(sp_tokenizer, "a") == [sp_tokenizer.convert_tokens_to_ids("a")]
    # 'é' has no piece: its two UTF-8 bytes
    assert vocab.spelling_tokens(sp_tokenizer, "é") == [ids[0xC3], ids[0xA9]]


def test_no_byte_tokens_is_an_error():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({"a": 0, "b": 1, "[UNK]": 2}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    with pytest.raises(ValueError, match="neither byte-level"):
        vocab.byte_tokens(PreTrainedTokenizerFast(tokenizer_object=tok))


# ---- required tokens -----------------------------------------------------------------------
def _assert_covers(req, tokenizer, texts):
    for text in texts:
        missing = set(tokenizer.encode(text, add_special_tokens=False)) - set(req)
        assert not missing, f"{text!r} uses tokens {missing} outside the required set"


def test_required_tokens_cover_every_valid_output(tiny_tokenizer):
    task = load_task("reddit-comment")
    eos = tiny_tokenizer.eos_token_id
    req = vocab.required_tokens(task, tiny_tokenizer, eos)
    assert req == sorted(set(req)) and eos in req
    outputs = [
        task.serialize(dict(zip(task.field_names, values)))
        for values in itertools.product(*(f.values for f in task.output.fields))
    ]
    assert len(outputs) == 24
    _assert_covers(req, tiny_tokenizer, outputs + task.fragments())
    # a single token spelling each character of the alphabet
    kept_bytes = {vocab.token_bytes(tiny_tokenizer, i) for i in req}
    for char in task.output_alphabet():
        assert char.encode() in kept_bytes, char


def test_required_tokens_large_product_substitutes_into_base(tiny_tokenizer):
    values = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta"]
    fields = [{"name": f"f{k}", "values": [f"{v}{k}" for v in values]} for k in range(5)]  # 7**5 > 4096
    task = task_from_dict({"name": "big", "prompt": {"system": "s"}, "output": {"fields": fields}})
    req = vocab.required_tokens(task, tiny_tokenizer, tiny_tokenizer.eos_token_id)
    base = {f["name"]: f["values"][0] for f in fields}
    _assert_covers(req, tiny_tokenizer, [task.serialize({**base, f["name"]: v}) for f in fields for v in f["values"]])
    assert len(vocab.example_outputs(task)) == 1 + 5 * 6


def test_required_tokens_free_fields_and_non_ascii(sp_tokenizer):
    task = task_from_dict(
        {
            "name": "mixed",
            "prompt": {"system": "s"},
            "output": {
                "fields": [
                    {"name": "mood", "values": ["gut", "schön"]},
                    {"name": "note", "type": "string", "max_length": 10},
                    {"name": "score", "type": "integer", "minimum": 1, "maximum": 5},
                ]
            },
        }
    )
    req = vocab.required_tokens(task, sp_tokenizer, sp_tokenizer.eos_token_id)
    byte_ids = vocab.byte_tokens(sp_tokenizer)
    assert {byte_ids[0xC3], byte_ids[0xB6]} <= set(req)  # 'ö' spelled in bytes
    for char in task.output_alphabet() - {"ö"}:
        assert set(vocab.spelling_tokens(sp_tokenizer, char)) <= set(req)
    for text in vocab.example_outputs(task):
        assert task.parse(text)["score"] in range(1, 6)


@pytest.mark.parametrize("preset", ["reddit-comment", "support-ticket"])
def test_grammar_inside_required_set_never_dead_ends(tiny_tokenizer, preset):
    """Random walks of constrained decoding limited to the required tokens all end in valid outputs."""
    task = load_task(preset)
    eos = tiny_tokenizer.eos_token_id
    req = vocab.required_tokens(task, tiny_tokenizer, eos)
    grammar = Grammar(task, tiny_tokenizer, len(tiny_tokenizer), eos, allowed=req)
    rng = random.Random(0)
    for _ in range(12):
        batch, ids = grammar.batch(1), []
        while not batch.done(0):
            logits = batch.mask_(torch.zeros(1, grammar.vocab_size))
            allowed = torch.nonzero(torch.isfinite(logits[0])).flatten().tolist()
            assert allowed and set(allowed) <= set(req), tiny_tokenizer.decode(ids)
            token = rng.choice(allowed)
            ids.append(token)
            batch.accept(0, token)
            assert len(ids) < 400
        assert ids[-1] == eos
        task.parse(tiny_tokenizer.decode(ids[:-1]))


# ---- kept selection ------------------------------------------------------------------------
def test_select_kept_order_size_and_coverage():
    mass = np.array([0.05, 0.30, 0.0, 0.20, 0.10, 0.20, 0.15])
    kept = vocab.select_kept([6, 2], mass, size=5)
    # required first in their order, then by mass, ties by id (3 before 5)
    assert kept == [6, 2, 1, 3, 5]
    assert vocab.coverage(kept, mass) == pytest.approx((0.15 + 0.0 + 0.30 + 0.20 + 0.20) / mass.sum())
    assert vocab.select_kept([6, 2, 6], mass, size=2) == [6, 2]
    assert vocab.select_kept([0, 1, 3, 4], mass, size=3) == [0, 1, 3, 4]  # required are never cut
    # zero-mass ids (padding rows) are never added, even below size
    assert vocab.select_kept([], mass, size=10) == [1, 3, 5, 6, 4, 0]
    assert vocab.coverage(list(range(7)), mass) == pytest.approx(1.0)


# ---- input vocabulary ----------------------------------------------------------------------
@pytest.mark.parametrize("style", ["byte-level", "sentencepiece"])
def test_input_encoder_round_trips_unseen_text(tiny_tokenizer, sp_tokenizer, style):
    tok = tiny_tokenizer if style == "byte-level" else sp_tokenizer
    seen = [tok.encode(t, add_special_tokens=False) for t in ["the one you are", "thanks so much"]]
    input_vocab = vocab.build_input_vocab(tok, seen)
    assert input_vocab == sorted(set(input_vocab))
    assert set(vocab.byte_tokens(tok)) | set(vocab.special_ids(tok)) | {i for s in seen for i in s} == set(input_vocab)
    enc = vocab.InputEncoder(tok, input_vocab)
    fell_back = False
    for text in UNSEEN:
        ids = enc.encode(text)
        assert set(ids) <= set(input_vocab)
        assert tok.decode(ids) == text
        fell_back |= ids != tok.encode(text, add_special_tokens=False)
    assert fell_back  # the test really exercised the byte fallback
    assert enc.encode("the one") == tok.encode("the one", add_special_tokens=False)  # seen tokens unchanged


def test_input_encoder_needs_byte_tokens(tiny_tokenizer):
    with pytest.raises(ValueError, match="byte tokens"):
        vocab.InputEncoder(tiny_tokenizer, [1, 2, 3])
