"""LaTen's attributions, cached per (model, example): the one place :func:`pktlib.laten.train`,
:func:`pktlib.laten.apply` and the sweeps get their neuron scores from.

A file ``<weights sha256>-<hash of the text and the scoring settings>.safetensors`` holds one
example's :class:`pktlib.attribution.Attribution`; scores do not depend on the transfer rate, the
seed, the step or the learning rate, so every run of a pair shares them.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Sequence

from torch import nn

from pktlib.attribution import Attribution, attribute, load_attribution, save_attribution

__all__ = ["cached_attribution", "attribute_examples"]


def _example_key(pair: tuple[str, str], normaliser: str, attn_coefficient: str = "summed") -> str:
    # The definition's coefficient keeps the key it had before the variant existed.
    parts = [*pair, normaliser] + ([attn_coefficient] if attn_coefficient != "summed" else [])
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:20]


def cached_attribution(model: nn.Module, tokenizer, pair: tuple[str, str], *, model_id: str,
                       cache_dir: str | os.PathLike | None, normaliser: str = "rms",
                       attn_coefficient: str = "summed") -> Attribution:
    """Attribution of one (prompt, answer) pair, read from / written to ``cache_dir`` if given.

    Scores do not depend on the transfer rate, the seed or the step, so sweeps reuse them; the
    file name holds the model's weights hash and a hash of the text.
    """
    return attribute_examples(model, tokenizer, [pair], model_id=model_id, cache_dir=cache_dir,
                              normaliser=normaliser, attn_coefficient=attn_coefficient)[0]


def attribute_examples(model: nn.Module, tokenizer, pairs: Sequence[tuple[str, str]], *, model_id: str,
                       cache_dir: str | os.PathLike | None, normaliser: str = "rms",
                       attn_coefficient: str = "summed", progress: bool = False) -> list[Attribution]:
    """The attribution of each (prompt, answer) pair on its own, cached per pair as
    :func:`cached_attribution` caches it; the pairs not in ``cache_dir`` are attributed in *one*
    :func:`pktlib.attribution.attribute` call (``per_example=True``).

    Why one call: at a real vocabulary the unembedded value vectors ``U`` (vocab x neurons, per
    layer) cost ~10x the per-example log-sum-exp and do not depend on the example, so a call
    with E pairs costs about one U pass plus E log-sum-exps instead of E of each (Qwen2.5-Coder
    1.5B on 2 cores: ~50 s + E x ~4 s per layer). Per-example scores equal single-pair calls up
    to float rounding of the batched forward pass. Returns one :class:`~pktlib.attribution.Attribution`
    per pair, in order (duplicates share one computation).
    """
    keys = [_example_key(p, normaliser, attn_coefficient) for p in pairs]
    paths = [Path(cache_dir) / f"{model_id}-{k}.safetensors" if cache_dir else None for k in keys]
    found: dict[str, Any] = {k: load_attribution(p) for k, p in zip(keys, paths) if p is not None and p.is_file()}
    todo = list(dict.fromkeys(k for k in keys if k not in found))  # unique, in order
    if todo:
        first = {k: keys.index(k) for k in todo}
        attr = attribute(model, tokenizer, [pairs[first[k]] for k in todo], normaliser=normaliser,
                         attn_coefficient=attn_coefficient, per_example=len(todo) > 1, progress=progress)
        for j, k in enumerate(todo):
            found[k] = attr.example(j) if len(todo) > 1 else attr
            if paths[first[k]] is not None:
                save_attribution(found[k], paths[first[k]])
    return [found[k] for k in keys]
