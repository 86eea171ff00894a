"""Shared test fixtures: tiny randomly initialised decoders of several architectures.

Nothing here downloads anything: the tokenizer is a byte-level BPE trained on a few lines in
memory, the models are built from configs with random weights.
"""
from __future__ import annotations

import os
import sys
from typing import NamedTuple

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

CORPUS = [
    "<|user|>\nWhat is the capital of France?\n\n<|assistant|>\nThe answer is: Paris.",
    "Answer the following question. Question: 3 + 4 = ? So the answer is 7.",
    "def add(a, b):\n    return a + b\n\nassert add(1, 2) == 3",
    "The following are multiple choice questions (with answers).\nA. one\nB. two\nC. three\nD. four",
    "Tom has 12 apples and gives 5 away, so he has 12 - 5 = 7 apples left.",
]


def make_tokenizer(vocab_size: int = 384):
    """A small byte-level BPE ``PreTrainedTokenizerFast`` with bos/eos/pad tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    return fast


ARCH_CONFIGS = {
    # name: (config class name, extra kwargs). Qwen2 and Mistral use grouped-query attention.
    "llama": ("LlamaConfig", dict(num_key_value_heads=4)),
    "qwen2": ("Qwen2Config", dict(num_key_value_heads=2)),
    "mistral": ("MistralConfig", dict(num_key_value_heads=2, sliding_window=None)),
}


def make_model(arch: str = "llama", *, tokenizer=None, hidden_size: int = 64, intermediate_size: int = 96,
               n_layers: int = 3, n_heads: int = 4, seed: int = 0, **overrides):
    """A tiny random ``*ForCausalLM`` of ``arch`` in float32, eval mode."""
    import transformers

    tokenizer = tokenizer or make_tokenizer()
    cls_name, extra = ARCH_CONFIGS[arch]
    kwargs = dict(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=intermediate_size,
                  num_hidden_layers=n_layers, num_attention_heads=n_heads, max_position_embeddings=256,
                  bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                  pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    kwargs.update(extra)
    kwargs.update(overrides)
    config = getattr(transformers, cls_name)(**kwargs)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # Random init is tiny (std 0.02): scale up so activations and logits are not all ~0.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2)
    return model.eval()


# (prompt, answer) pairs in the default chat format, for attribution/Seeking tests.
PAIRS = [("<|user|>\nWhat is 3 + 4?\n\n<|assistant|>\n", "So the answer is 7."),
         ("<|user|>\nCapital of France?\n\n<|assistant|>\n", "The answer is: Paris.")]


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """Tiny models run fastest on one thread (and far faster on a shared, loaded machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module", autouse=True)
def cache(tmp_path_factory):
    """A private ``PKT_CACHE`` per test module, for every module: tests never touch (or wait for) a
    user's suite, pairs, score caches or shared teacher answers."""
    mp = pytest.MonkeyPatch()
    d = tmp_path_factory.mktemp("pkt-cache")
    mp.setenv("PKT_CACHE", str(d))
    yield d
    mp.undo()


@pytest.fixture(scope="session")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(params=["llama", "qwen2", "mistral"])
def arch(request):
    return request.param


@pytest.fixture
def tiny_model(arch, tokenizer):
    return make_model(arch, tokenizer=tokenizer)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory, tokenizer):
    """A tiny Llama saved in Hugging Face format (config, safetensors, tokenizer)."""
    d = tmp_path_factory.mktemp("tiny-llama")
    make_model("llama", tokenizer=tokenizer).save_pretrained(d)
    tokenizer.save_pretrained(d)
    return d


class CliResult(NamedTuple):
    code: int
    out: str
    err: str


@pytest.fixture
def pkt(monkeypatch, capsys):
    """``pkt(*args)`` runs the ``pkt`` command in this process and returns ``(code, out, err)``.

    In-process because a ``pkt`` subprocess spends most of its time importing torch; the
    entry point's own process is covered once in test_cli.py.
    """
    from pktlib import cli

    def run(*args) -> CliResult:
        monkeypatch.setattr(sys, "argv", ["pkt", *map(str, args)])
        try:
            cli.main()
            code = 0
        except SystemExit as e:
            code = e.code or 0
        out = capsys.readouterr()
        return CliResult(code, out.out, out.err)

    return run

