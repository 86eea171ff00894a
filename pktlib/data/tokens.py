"""Prompt formatting and tokenisation with label masking (prompt and answer tokenised as one
string, the prompt masked by character offsets), and batching."""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import torch

from pktlib.errors import PktError
from pktlib.data.examples import Example

__all__ = ["format_prompt", "prompt_answer_pairs", "answer_token_budget", "Batch", "tokenize_example", "collate"]


def format_prompt(messages: Sequence[dict[str, str]], *, tokenizer=None, template: str = "default") -> str:
    """Prompt text for ``messages`` without the final answer, ending with the assistant header.

    ``template="default"`` is the original code's format (``<|user|>\\n{content}\\n\\n<|assistant|>\\n``,
    one block per turn); ``template="chat"`` uses ``tokenizer``'s chat template instead;
    ``template="auto"`` the chat template when the tokenizer has one, else the default (the
    rule the paper's evaluator follows, :mod:`pktlib.evaluation.protocols`).
    A trailing assistant message (the reference answer) is dropped.
    """
    msgs = list(messages)
    if msgs and msgs[-1]["role"] == "assistant":
        msgs = msgs[:-1]
    if template == "auto":
        template = "chat" if getattr(tokenizer, "chat_template", None) else "default"
    if template == "chat":
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise PktError("template='chat' needs a tokenizer with a chat template")
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    if template != "default":
        raise PktError(f"unknown prompt template {template!r}; expected 'default', 'chat' or 'auto'")
    text = ""
    for m in msgs:
        text += f"<|{m['role']}|>\n{m['content'].strip()}\n\n" if m["role"] != "assistant" else f"<|assistant|>\n{m['content']}\n\n"
    return text + "<|assistant|>\n"


def prompt_answer_pairs(examples: Iterable[Example], **prompt_kwargs) -> list[tuple[str, str]]:
    """``(prompt_text, answer_text)`` for each example, as attribution and Seeking consume them."""
    return [(format_prompt(ex.messages, **prompt_kwargs), ex.answer) for ex in examples]


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, T)
    attention_mask: torch.Tensor  # (B, T)
    labels: torch.Tensor  # (B, T), -100 where no loss
    n_truncated: int = 0

    def to(self, device) -> "Batch":
        return Batch(self.input_ids.to(device), self.attention_mask.to(device), self.labels.to(device), self.n_truncated)

    def model_inputs(self) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask, "labels": self.labels}


def _joined_ids(tokenizer, prompt: str, answer: str) -> tuple[list[int], int]:
    """``prompt + answer`` tokenised as one string (special tokens included), and how many
    leading tokens belong to the prompt.

    With character offsets (fast tokenizers): the tokens before the first one that ends past
    the prompt's last character; a token straddling the boundary carries answer characters
    and so counts as an answer token. Without offsets: the longest common prefix of the ids
    and the prompt tokenised alone.
    """
    text = prompt + answer
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(text, add_special_tokens=True, return_offsets_mapping=True)
        ids = list(enc["input_ids"])
        n_chars = len(prompt)
        n = next((i for i, (start, end) in enumerate(enc["offset_mapping"]) if end > n_chars and end > start), len(ids))
        return ids, n
    ids = list(tokenizer(text, add_special_tokens=True)["input_ids"])
    alone = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    n = 0
    while n < min(len(alone), len(ids)) and alone[n] == ids[n]:
        n += 1
    return ids, n


def tokenize_example(tokenizer, example: Example | tuple[str, str], *, max_length: int | None = None,
                     train_on_inputs: bool = False, add_eos: bool = True, **prompt_kwargs) -> dict[str, Any]:
    """Token ids and labels of prompt + answer (+ EOS), as the model sees them; the prompt's
    labels are masked (-100) unless ``train_on_inputs``.

    The one tokenisation of (prompt, answer) pairs: fine-tuning, LaTen alignment, Seeking's
    sensitivity and attribution all call it. The prompt and the answer are tokenised as *one*
    string, with the tokenizer's special tokens (BOS), and the prompt's tokens are found by
    character offsets. Tokenising the two parts separately is not the same: a SentencePiece
    tokenizer (Llama-2, Mistral) then starts the answer with a word-boundary marker it does not
    have in the joined text, and byte-level BPEs can merge characters across the boundary.

    Returns ``{"input_ids", "labels", "n_prompt", "truncated"}`` (``n_prompt``: how many
    leading tokens are the prompt's). Truncation keeps the start and is reported through
    ``truncated``; :func:`collate` counts it and warns. An EOS the tokenizer already appends
    is not added twice.
    """
    if isinstance(example, Example):
        prompt, answer = format_prompt(example.messages, **prompt_kwargs), example.answer
    else:
        prompt, answer = example
    ids, n_prompt = _joined_ids(tokenizer, prompt, answer)
    eos = tokenizer.eos_token_id
    if add_eos and eos is not None and (not ids or ids[-1] != eos):
        ids = ids + [eos]
    labels = list(ids) if train_on_inputs else [-100] * n_prompt + ids[n_prompt:]
    truncated = max_length is not None and len(ids) > max_length
    if truncated:
        ids, labels = ids[:max_length], labels[:max_length]
    return {"input_ids": ids, "labels": labels, "n_prompt": min(n_prompt, len(ids)), "truncated": truncated}


def collate(items: Sequence[dict[str, Any]], pad_id: int, *, padding_side: str = "right") -> Batch:
    """Pad tokenised items into a :class:`Batch`; warns with the count of truncated items."""
    T = max(len(it["input_ids"]) for it in items)
    B = len(items)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    labels = torch.full((B, T), -100, dtype=torch.long)
    mask = torch.zeros((B, T), dtype=torch.long)
    for b, it in enumerate(items):
        n = len(it["input_ids"])
        sl = slice(0, n) if padding_side == "right" else slice(T - n, T)
        ids[b, sl] = torch.tensor(it["input_ids"])
        labels[b, sl] = torch.tensor(it["labels"])
        mask[b, sl] = 1
    n_trunc = sum(bool(it.get("truncated")) for it in items)
    if n_trunc:
        warnings.warn(f"{n_trunc} of {B} examples were truncated to {T} tokens", stacklevel=2)
    return Batch(ids, mask, labels, n_trunc)


def answer_token_budget(tokenizer, answers: Sequence[str], margin: float) -> int:
    """New tokens to allow for generated answers: ``ceil(margin x longest answer) + 2``.

    The longest of ``answers`` is measured in ``tokenizer`` tokens (as the tokenizer encodes a
    text by default, special tokens included); the 2 leave room for an end-of-sequence token.
    A damaged model fills any budget with garbage, so the budget follows the reference answers.
    Raises PktError when ``answers`` is empty or ``margin <= 0``.
    """
    if margin <= 0:
        raise PktError(f"generation margin must be positive, got {margin}")
    if not answers:
        raise PktError("no reference answers to size the generation budget from")
    return int(math.ceil(margin * max(len(tokenizer(a)["input_ids"]) for a in answers))) + 2
