"""Pocket-pair checkpoints on disk: saving one with its card, reading cards, scoring the pair.

Each checkpoint folder is a Hugging Face model with its tokenizer, ``card.json`` (architecture,
parameters, training stages with their loss curves, test scores) and ``CARD.md`` (the same as a
table).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from pktlib.errors import PktError
from pktlib.evaluation import evaluate
from pktlib.records import atomic_dir, write_json
from pktlib.data.suite import FAMILIES
from pktlib.zoo.config import PocketPair

__all__ = ["MAX_NEW_TOKENS", "save_checkpoint", "card_markdown", "read_card", "score_pair"]

# Greedy decoding budget per family: the longest reference answer is ~8 (knowledge), ~50 (math)
# and ~45 (code) tokens; a tight budget keeps a rambling small model from costing minutes.
MAX_NEW_TOKENS = {"knowledge": 16, "math": 64, "code": 64}


def _write_card(folder: Path, card: dict[str, Any]) -> None:
    write_json(folder / "card.json", card)
    (folder / "CARD.md").write_text(card_markdown(card), encoding="utf-8")


def save_checkpoint(model, tokenizer, out: Path, card: dict[str, Any]) -> None:
    """Save in Hugging Face format with the card, through a temporary folder: ``out`` is complete or absent."""
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        _write_card(tmp, card)


def card_markdown(card: dict[str, Any]) -> str:
    """The card as a two-column markdown table (``CARD.md``)."""
    arch = card["architecture"]
    rows = [("checkpoint", card["name"]), ("preset / seed", f"{card['preset']} / {card['seed']}"),
            ("layers", arch["n_layers"]), ("hidden size", arch["hidden_size"]),
            ("FFN size", arch["intermediate_size"]), ("heads x head_dim", f"{arch['n_heads']} x {arch['head_dim']}"),
            ("vocabulary", arch["vocab_size"]), ("parameters", f"{card['parameters']:,}")]
    for stage, t in card["training"].items():
        rows.append((f"{stage}: steps / tokens / seconds", f"{t['steps']} / {t['tokens']:,} / {t['seconds']:.0f}"))
        if t["loss_curve"]:
            rows.append((f"{stage}: final loss", f"{t['loss_curve'][-1][1]:.3f}"))
    for task, s in (card.get("scores") or {}).items():
        rows.append((f"{task} (test)", f"{s:.1f}"))
    return "| field | value |\n| --- | --- |\n" + "\n".join(f"| {k} | {v} |" for k, v in rows) + "\n"


def read_card(checkpoint: str | os.PathLike) -> dict[str, Any]:
    """``card.json`` of a pocket-pair checkpoint folder."""
    path = Path(checkpoint) / "card.json"
    if not path.is_file():
        raise PktError(f"{checkpoint} has no card.json: not a pocket-pair checkpoint")
    return json.loads(path.read_text(encoding="utf-8"))


def score_pair(pair: PocketPair, *, force: bool = False, limit: int | None = None,
               progress: bool = True) -> dict[str, dict[str, float]]:
    """Test scores (0-100) of every checkpoint on every family: ``{checkpoint: {task: score}}``.

    Uses :func:`pktlib.evaluation.evaluate` (greedy, Hugging Face backend, :data:`MAX_NEW_TOKENS`).
    Full-split scores are written into the cards (and read back from them unless ``force``);
    scores on the first ``limit`` test examples are returned but not stored.
    """
    out = {}
    for name, path in pair.checkpoints().items():
        card = read_card(path)
        if card.get("scores") and not force and limit is None:
            out[name] = card["scores"]
            continue
        scores, seconds = {}, 0.0
        for fam in FAMILIES:
            res = evaluate(path, f"pocket-{fam}", split="test", backend="hf", limit=limit, batch_size=64,
                           max_new_tokens=MAX_NEW_TOKENS[fam], progress=progress)
            scores[f"pocket-{fam}"] = float(res.score)
            seconds += res.wall_s
        if limit is None:
            card["scores"], card["scoring_seconds"] = scores, round(seconds, 1)
            _write_card(path, card)
        out[name] = scores
    return out
