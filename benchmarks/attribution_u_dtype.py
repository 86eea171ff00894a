"""Attribution with ``U = E diag(g) W`` multiplied in bfloat16 beside float32: time and the neurons selected.

    .venv/bin/python benchmarks/attribution_u_dtype.py [--pair qwen2.5-coder-1.5b-0.5b] [--role teacher]
        [--n 2] [--layers 2] [--threads 2] [--chunk 1024] [--rate 0.1] [--out results.json]

On the same recorded vectors (one forward pass of ``--n`` GSM8K extract examples through the
pair's ``--role`` model), the FFN and attention neurons of the ``--layers`` last layers are scored
by :func:`pktlib.lens.lens_scores` with a float32 lens and with a bfloat16 one, alternately, so
that both see the same machine load. Printed per dtype: seconds for ``U`` alone and for the whole
scoring (``U`` + log-sum-exps), and the ratio float32 / bfloat16. Then what the rounding changes,
per example and per kind of neuron: the largest score difference relative to the largest score,
the rank correlation of the scores, and the share of float32's top-k neurons (k as LaTen selects
them at ``--rate``, :func:`pktlib.selection.layer_budget`) that bfloat16's top-k also holds. Layer
scores do not use ``U``, so the layers LaTen selects are the same under both.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pktlib import activations  # noqa: E402
from pktlib import attribution as A  # noqa: E402
from pktlib.data import load_task, prompt_answer_pairs  # noqa: E402
from pktlib.lens import LogitLens, lens_scores  # noqa: E402
from pktlib.models import VALUE_MODULES, load_model, spec  # noqa: E402
from pktlib.pairs import get_pair  # noqa: E402
from pktlib.selection import layer_budget  # noqa: E402


def _rank_corr(a: torch.Tensor, b: torch.Tensor) -> float:
    ra, rb = a.argsort().argsort().double(), b.argsort().argsort().double()
    return float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pair", default="qwen2.5-coder-1.5b-0.5b")
    ap.add_argument("--role", default="teacher", choices=["teacher", "student"])
    ap.add_argument("--n", type=int, default=2, help="GSM8K extract examples")
    ap.add_argument("--layers", type=int, default=2, help="last layers whose neurons are scored")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--chunk", type=int, default=1024)
    ap.add_argument("--rate", type=float, default=0.1, help="transfer rate giving top-k (LaTen's selection)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    p = get_pair(args.pair, require=True)
    model, tok = load_model(getattr(p, args.role))
    s = spec(model)
    _, k_ffn, k_attn = layer_budget(*p.specs().values(), args.rate)
    pairs = prompt_answer_pairs(load_task("gsm8k", "extract", limit=args.n), tokenizer=tok, template="auto")
    seqs = A._encode(tok, pairs)
    rec = activations.record(model, s, seqs, tok.pad_token_id or 0, torch.device("cpu"))
    rho = A._rms(rec.h_final, s.norm_eps)
    lenses = {dt: LogitLens.of(model, s, u_dtype=dt) for dt in ("float32", "bfloat16")}
    secs = {dt: {"U_s": 0.0, "scoring_s": 0.0} for dt in lenses}  # scoring: lens_scores, U included
    scores: dict[str, dict[str, list[torch.Tensor]]] = {dt: {"ffn": [], "attn": []} for dt in lenses}
    for l in range(s.n_layers - args.layers, s.n_layers):
        x, r = rec.x[:, l], rec.x[:, l] + rec.attn_out[:, l]
        for kind, base, coef in (("attn", x, rec.attn_coef[:, l]), ("ffn", r, rec.ffn_coef[:, l])):
            W = s.weight(model, l, VALUE_MODULES[kind]).detach()
            for dt, lens in lenses.items():  # alternately: both dtypes under the same load
                t0 = time.perf_counter()
                for c0 in range(0, W.shape[1], args.chunk):
                    lens.directions_t(W[:, c0:c0 + args.chunk])
                t1 = time.perf_counter()
                scores[dt][kind].append(lens_scores(lens, base, coef, W, rho, rec.target, chunk_size=args.chunk))
                secs[dt]["U_s"] += t1 - t0
                secs[dt]["scoring_s"] += time.perf_counter() - t1
    agreement = {}
    for kind, k in (("ffn", k_ffn), ("attn", k_attn)):
        ref, low = torch.stack(scores["float32"][kind], 1), torch.stack(scores["bfloat16"][kind], 1)  # (B, layers, N)
        rows = []
        for b in range(ref.shape[0]):
            for j in range(ref.shape[1]):
                a, c = ref[b, j], low[b, j]
                top_a, top_c = set(a.topk(k).indices.tolist()), set(c.topk(k).indices.tolist())
                rows.append({"max_rel_diff": float((a - c).abs().max() / a.abs().max()),
                             "rank_corr": _rank_corr(a, c), "topk_kept": len(top_a & top_c) / k})
        agreement[kind] = {"k": k, **{m: min(r[m] for r in rows) if m != "max_rel_diff" else max(r[m] for r in rows)
                                      for m in rows[0]}}
    out = {"model": f"{p.name} {args.role}", "vocab": s.vocab_size, "hidden": s.hidden_size,
           "neurons_per_layer": s.intermediate_size + s.attn_size, "layers_scored": args.layers, "examples": args.n,
           "threads": args.threads, "seconds": {dt: {k: round(v, 2) for k, v in d.items()} for dt, d in secs.items()},
           "agreement_worst_case": agreement}
    f, b = secs["float32"], secs["bfloat16"]
    print(f"{out['model']}: {args.layers} layer(s) x {out['neurons_per_layer']} neurons, {args.n} examples, "
          f"V = {s.vocab_size}, {args.threads} threads")
    print(f"{'u_dtype':>10} {'U s':>8} {'U + lse s':>10}")
    for dt, d in secs.items():
        print(f"{dt:>10} {d['U_s']:8.1f} {d['scoring_s']:10.1f}")
    print(f"float32 / bfloat16: U x{f['U_s'] / b['U_s']:.2f}, scoring (U + lse) "
          f"x{f['scoring_s'] / b['scoring_s']:.2f}")
    for kind, a in agreement.items():
        print(f"{kind}: worst over examples and layers: top-{a['k']} kept {a['topk_kept']:.1%}, rank correlation "
              f"{a['rank_corr']:.5f}, largest score difference {a['max_rel_diff']:.1e} of the largest score")
    if args.out:
        args.out.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
