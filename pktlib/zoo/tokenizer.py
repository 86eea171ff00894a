"""The pocket pair's tokenizer: a byte-level BPE trained here, on the suite's texts."""
from __future__ import annotations

from typing import Sequence

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tokenizers.processors import TemplateProcessing
from transformers import PreTrainedTokenizerFast

__all__ = ["train_tokenizer"]


def train_tokenizer(texts: Sequence[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE ``PreTrainedTokenizerFast`` (bos ``<s>``, eos ``</s>``, pad ``<pad>``).

    Byte-level, so it round-trips any text; trained deterministically on ``texts``.
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    # Every number 0..99 as one token (a leading space, as in the corpus): arithmetic then works on
    # whole numbers, so each step of a math problem is one lookup rather than digit-by-digit carries.
    numbers = [" ".join(str(i) for i in range(100))] * 100
    tok.train_from_iterator(list(texts) + numbers, trainer)
    bos = tok.token_to_id("<s>")
    # Prepend <s> when add_special_tokens=True, as Llama tokenizers do.
    tok.post_processor = TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   model_max_length=512)
