"""Chat examples: the :class:`Example` type and its ``.jsonl`` files (read with validation, written atomically).

Every task, real or synthetic, is a list of examples whose ``messages`` are chat turns
(``{"role": "user"|"assistant"|"system", "content": ...}``) ending with the assistant's
reference answer, plus task-specific ``meta`` (the gold answer, tests for code tasks ...).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from pktlib.errors import DataError
from pktlib.records import atomic_write_text

__all__ = ["Example", "ROLES", "check_messages", "load_examples", "write_examples"]

ROLES = ("system", "user", "assistant")


@dataclass
class Example:
    """One chat example; the last message is the assistant's reference answer."""

    messages: list[dict[str, str]]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def prompt_messages(self) -> list[dict[str, str]]:
        return self.messages[:-1] if self.messages[-1]["role"] == "assistant" else self.messages

    @property
    def answer(self) -> str:
        return self.messages[-1]["content"] if self.messages[-1]["role"] == "assistant" else ""

    @property
    def id(self) -> str:
        return str(self.meta.get("id", self.meta.get("task_id", "")))


def check_messages(path: Path, line: int, row: Any) -> list[dict[str, str]]:
    """``row["messages"]`` if it is a valid chat (roles, contents, ending with the answer); else a
    :class:`DataError` naming ``path`` and ``line``."""
    if not isinstance(row, dict) or "messages" not in row:
        raise DataError(path, "missing 'messages'", line)
    msgs = row["messages"]
    if not isinstance(msgs, list) or not msgs:
        raise DataError(path, "'messages' must be a non-empty list", line)
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise DataError(path, f"message {i} needs 'role' and 'content'", line)
        if m["role"] not in ROLES:
            raise DataError(path, f"message {i} has role {m['role']!r}; expected one of {ROLES}", line)
        if not isinstance(m["content"], str):
            raise DataError(path, f"message {i} content is not a string", line)
    if msgs[-1]["role"] != "assistant":
        raise DataError(path, f"last message has role {msgs[-1]['role']!r}; expected 'assistant'", line)
    return msgs


def load_examples(path: str | os.PathLike) -> list[Example]:
    """Read a ``.jsonl`` file of ``{"messages": [...], ...}`` rows.

    Other keys of a row go to ``Example.meta``. Raises :class:`DataError` (a ``ValueError``)
    naming the file and line for malformed JSON, an empty file, missing ``messages`` or bad roles.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "no such file")
    examples = []
    with open(path, encoding="utf-8") as fh:
        for line_no, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(path, f"malformed JSON ({e.msg}, column {e.colno})", line_no) from None
            msgs = check_messages(path, line_no, row)
            meta = {k: v for k, v in row.items() if k != "messages"}
            examples.append(Example(msgs, meta))
    if not examples:
        raise DataError(path, "empty file: no examples")
    return examples


def write_examples(path: str | os.PathLike, examples: Iterable[Example]) -> None:
    """Write examples as jsonl (atomically), the inverse of :func:`load_examples`."""
    rows = [json.dumps({**ex.meta, "messages": ex.messages}, ensure_ascii=False) for ex in examples]
    atomic_write_text(path, "\n".join(rows) + "\n")
