"""LaTen's attributions one example at a time against all examples in one call, side by side.

    .venv/bin/python benchmarks/laten_attribution_batched.py [--n 6] [--threads 2]
        [--model pocket-teacher|real-teacher|real-student] [--layers 1] [--pocket-preset default]

LaTen locates every extract example and each seed's unseen example in both models.
:func:`pktlib.laten.attribute_examples` attributes them in one
:func:`pktlib.attribution.attribute` call (``per_example=True``), so the unembedded value vectors
``U = E diag(g) W`` (vocab x neurons per layer, the same for every example) are computed once
instead of once per example. This script times ``--n`` GSM8K extract examples both ways on one
model, checks that the per-example scores agree, and prints the ratio. On the real pair only the
neurons of the last ``--layers`` layers are scored (``attribute(layers=...)``; both ways alike:
the per-layer costs that decide the ratio are the same in every layer). The real pair must have been fetched (``make real-pair``).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pktlib.attribution import attribute  # noqa: E402
from pktlib.data import load_task, prompt_answer_pairs  # noqa: E402
from pktlib.models import load_model, spec  # noqa: E402
from pktlib.pairs import get_pair  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=6, help="examples (LaTen on GSM8K, 2 seeds: 4 + 2 = 6)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--model", default="pocket-teacher", choices=["pocket-teacher", "real-teacher", "real-student"])
    ap.add_argument("--layers", type=int, default=1, help="real models: last layers whose neurons are scored")
    ap.add_argument("--pocket-preset", default="default")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.model == "pocket-teacher":
        path = get_pair("pocket", preset=args.pocket_preset, require=True).teacher
    else:
        path = getattr(get_pair("qwen2.5-coder-1.5b-0.5b", require=True), args.model.split("-")[1])
    model, tok = load_model(path)
    s = spec(model)
    layers = None if args.model == "pocket-teacher" else list(range(s.n_layers - args.layers, s.n_layers))
    pairs = prompt_answer_pairs(load_task("gsm8k", "extract", limit=args.n), tokenizer=tok, template="auto")
    t0 = time.perf_counter()
    one_by_one = [attribute(model, tok, [p], layers=layers) for p in pairs]
    t_single = time.perf_counter() - t0
    t0 = time.perf_counter()
    together = attribute(model, tok, pairs, per_example=True, layers=layers)
    t_batched = time.perf_counter() - t0
    diff = max(float((together.example(i).scores(k) - a.scores(k)).nan_to_num().abs().max())
               for i, a in enumerate(one_by_one) for k in ("ffn", "attn"))
    print(f"{args.model} ({s.n_layers} layers, vocab {s.vocab_size}, {s.intermediate_size} FFN + {s.attn_size} "
          f"attention neurons per layer), {args.n} examples, {args.threads} threads"
          + ("" if layers is None else f"; neurons of the last {len(layers)} layer(s) scored"))
    print(f"{'one call per example':>24}: {t_single:8.1f} s")
    print(f"{'one call for all':>24}: {t_batched:8.1f} s")
    print(f"{'ratio':>24}: {t_single / t_batched:8.2f} x   (largest score difference {diff:.1e})")


if __name__ == "__main__":
    main()
