"""Shared fixtures: a tiny byte-level BPE tokenizer with a chat template, built in the test run."""

from __future__ import annotations


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


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """Run torch on one thread; yields the original count for the tests of the real teacher.

    Tiny models run several times faster this way on 2 busy cores: waking a second OpenMP
    thread costs more than their matmuls, and two spinning threads can stall each other.
    """
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield n
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_tokenizer")
    build_tiny_tokenizer(path)
    return path


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir))


def build_tiny_teacher(path, tokenizer_dir, seed: int = 0):
    """A tiny random Qwen2 causal LM saved with the tiny tokenizer as one Hugging Face folder.

    Its weights are random except for one nudge: embedding dimension 0 is a constant and the
    output row of each token reads it scaled by the token's length, so longer tokens score
    higher. Like a real teacher, it then answers in ~20-30 tokens (a purely random one spells
    answers character by character and runs past max_tokens), while the random rest of the
    weights still gives different inputs different labels.
    """
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False, initializer_range=0.2,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=None,
    )
    model = Qwen2ForCausalLM(config)
    lengths = torch.tensor([len(tok.decode([i])) for i in range(len(tok))], dtype=torch.float32)
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 0] = 1.0
        model.lm_head.weight[:, 0] = 0.7 * lengths
    model.save_pretrained(str(path))
    tok.save_pretrained(str(path))
    return path


@pytest.fixture(scope="session")
def tiny_teacher_dir(tmp_path_factory, tiny_tokenizer_dir):
    """Folder usable as `--teacher <folder>`: a seeded tiny random Qwen2 model + the tiny tokenizer."""
    return build_tiny_teacher(tmp_path_factory.mktemp("tiny_teacher"), tiny_tokenizer_dir)


def pytest_collection_modifyitems(config, items):
    """Tests marked `vllm` need a vLLM server at MICRODISTILL_VLLM_URL (scripts/vllm_server.sh test
    starts one and sets it); without it they are deselected, and the summary counts them."""
    import os

    if os.environ.get("MICRODISTILL_VLLM_URL"):
        return
    deselected = [item for item in items if item.get_closest_marker("vllm")]
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = [item for item in items if not item.get_closest_marker("vllm")]
