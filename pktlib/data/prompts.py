"""The user prompts of the paper's task kinds (original code's templates), shared by the real tasks
(:mod:`pktlib.data`) and the pocket suite (:mod:`pktlib.data.suite`), which asks its questions in the
same words as MMLU, GSM8K and the code benchmarks."""
from __future__ import annotations

from typing import Sequence

__all__ = ["gsm_user_prompt", "mmlu_user_prompt", "code_user_prompt"]


def gsm_user_prompt(question: str) -> str:
    return f"Answer the following question.\n\nQuestion: {question}"


def mmlu_user_prompt(subject: str, question: str, choices: Sequence[str]) -> str:
    lines = [f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.", "", question]
    lines += [f"{letter}. {c}" for letter, c in zip("ABCD", choices)]
    return "\n".join(lines) + "\nAnswer:"


def code_user_prompt(description: str) -> str:
    return f"Complete the following python function.\n\n\n{description}"
