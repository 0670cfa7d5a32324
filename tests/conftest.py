"""Shared fixtures: a tiny byte-level BPE tokenizer with a chat template, built in the test run."""

from __future__ import annotations

import json

import pytest

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

CORPUS = [
    "you are an idiot and nobody likes you",
    "thanks so much, this fixed my problem!",
    "what a lovely day at the beach with friends",
    "this is the worst service I have ever had",
    "I think the update is fine, nothing special",
    "shut up, you worthless troll",
    '{"tone":"aggressive","sentiment":"negative","safety":"harmful","toxicity":"toxic"}',
    '{"tone":"neutral","sentiment":"positive","safety":"safe","toxicity":"respectful"}',
    '{"tone":"neutral","sentiment":"neutral","safety":"safe","toxicity":"respectful"}',
    '{"team":"billing","urgency":"high","summary":"double charge"}',
    "Comment: Message: system user assistant",
]


def build_tiny_tokenizer(path, vocab_size: int = 600):
    """A real (trained) byte-level BPE tokenizer saved as Hugging Face files in `path`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS * 20, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token=None
    )
    fast.chat_template = CHATML
    fast.save_pretrained(str(path))
    return fast


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_tokenizer")
    build_tiny_tokenizer(path)
    return path


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir))
