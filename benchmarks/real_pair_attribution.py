"""Where the time of attribution goes at a 152k vocabulary: the real pair's teacher beside the pocket teacher.

    .venv/bin/python benchmarks/real_pair_attribution.py [--n 2] [--layers 1] [--fraction 0.25]
        [--threads 2] [--pocket-preset default] [--models teacher,student] [--chunk 1024] [--out results.json]

For each model, in one run: ``--n`` GSM8K extract examples are attributed phase by phase, as
:func:`pktlib.attribution.attribute` does it:

* ``forward``: one batched forward pass recording the vectors at the predicting positions;
* ``U``: per layer, the unembedded value vectors ``U = E diag(g) W`` of every FFN and attention
  neuron (``V x d x (N + A)`` multiply-adds, shared by all examples);
* ``lse``: per layer and example, the log-sum-exp over the vocabulary for every neuron
  (``V x (N + A)`` exponentials).

On the real models only the first ``--fraction`` of the neurons of ``--layers`` layers (the last
ones) are scored, and the times are extrapolated linearly to every neuron of every layer (both
phases are linear in the number of neurons and of layers); on the pocket teacher every layer is, and the full
:func:`~pktlib.attribution.attribute` call is timed too, to check the phase sum against it.
It prints the phases side by side with the ratios to the pocket teacher, and the ratios the
shapes predict (``L x V x d x (N + A)`` for U, ``L x V x (N + A)`` per example for lse).
The real pair must have been fetched (``make real-pair``).
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


@torch.no_grad()
def phases(model, tok, pairs, *, layers: int | None, chunk: int, fraction: float = 1.0) -> dict:
    """Seconds of each phase for ``pairs`` (scoring the first ``fraction`` of the neurons of the
    ``layers`` last layers, None: all, extrapolated to the whole model) and the shapes."""
    s = spec(model)
    lens = LogitLens.of(model, s)
    seqs = A._encode(tok, pairs)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    t0 = time.perf_counter()
    rec = activations.record(model, s, seqs, pad, torch.device("cpu"))
    forward = time.perf_counter() - t0
    rho = A._rms(rec.h_final, s.norm_eps)
    scored = list(range(s.n_layers))[-(layers or s.n_layers):]
    u_s = lse_s = 0.0
    for l in scored:
        x, r = rec.x[:, l], rec.x[:, l] + rec.attn_out[:, l]
        for kind, base, coef in (("attn", x, rec.attn_coef[:, l]), ("ffn", r, rec.ffn_coef[:, l])):
            W = s.weight(model, l, VALUE_MODULES[kind]).detach()
            keep = max(1, int(round(W.shape[1] * fraction)))
            W, coef = W[:, :keep], coef[:, :keep]
            t0 = time.perf_counter()
            for c0 in range(0, W.shape[1], chunk):  # U alone, in the same chunks
                lens.directions_t(W[:, c0:c0 + chunk])
            t1 = time.perf_counter()
            lens_scores(lens, base, coef, W, rho, rec.target, chunk_size=chunk)  # U + lse
            t2 = time.perf_counter()
            u_s += t1 - t0
            lse_s += max(0.0, (t2 - t1) - (t1 - t0))
    k = s.n_layers / len(scored) / fraction
    return {"vocab": s.vocab_size, "hidden": s.hidden_size, "neurons_per_layer": s.intermediate_size + s.attn_size,
            "layers": s.n_layers, "layers_timed": len(scored), "neuron_fraction_timed": fraction,
            "examples": len(pairs),
            "forward_s": round(forward, 4), "U_s": round(u_s * k, 4), "lse_s": round(lse_s * k, 4),
            "total_s": round(forward + (u_s + lse_s) * k, 4)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=2)
    ap.add_argument("--layers", type=int, default=1, help="layers of the real models scored (then extrapolated)")
    ap.add_argument("--fraction", type=float, default=0.25, help="share of each timed layer's neurons (real models)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--pocket-preset", default="default")
    ap.add_argument("--models", default="teacher", help="real-pair roles to time: teacher, student or both")
    ap.add_argument("--chunk", type=int, default=1024)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    pairs = prompt_answer_pairs(load_task("gsm8k", "extract", limit=args.n))
    rows = {}
    pocket = get_pair("pocket", preset=args.pocket_preset, require=True)
    model, tok = load_model(pocket.teacher)
    rows["pocket teacher"] = phases(model, tok, pairs, layers=None, chunk=args.chunk)
    t0 = time.perf_counter()
    A.attribute(model, tok, pairs, chunk_size=args.chunk)
    rows["pocket teacher"]["attribute_call_s"] = round(time.perf_counter() - t0, 3)
    real = get_pair("qwen2.5-coder-1.5b-0.5b", require=True)
    for role in [r.strip() for r in args.models.split(",") if r.strip()]:
        t0 = time.perf_counter()
        model, tok = load_model(getattr(real, role))
        load_s = time.perf_counter() - t0
        rows[f"real {role}"] = {**phases(model, tok, pairs, layers=args.layers, chunk=args.chunk,
                                         fraction=args.fraction),
                                "load_s": round(load_s, 1)}
        del model
    base = rows["pocket teacher"]
    print(f"attribution of {args.n} GSM8K extract examples, {args.threads} threads; real models: "
          f"{args.fraction:.0%} of the neurons of {args.layers} layer(s) timed, extrapolated to all")
    head = ("model", "V", "d", "N+A", "L", "forward s", "U s", "lse s", "total s", "x pocket", "U x shapes",
            "lse x shapes")
    print("  ".join(f"{h:>14}" for h in head))
    for name, r in rows.items():
        u_pred = (r["layers"] * r["vocab"] * r["hidden"] * r["neurons_per_layer"]) / (
            base["layers"] * base["vocab"] * base["hidden"] * base["neurons_per_layer"])
        lse_pred = (r["layers"] * r["vocab"] * r["neurons_per_layer"]) / (
            base["layers"] * base["vocab"] * base["neurons_per_layer"])
        r["ratio_total"] = round(r["total_s"] / base["total_s"], 1)
        r["ratio_U_measured"] = round(r["U_s"] / max(base["U_s"], 1e-9), 1)
        r["ratio_lse_measured"] = round(r["lse_s"] / max(base["lse_s"], 1e-9), 1)
        vals = (name, r["vocab"], r["hidden"], r["neurons_per_layer"], r["layers"], r["forward_s"], r["U_s"],
                r["lse_s"], r["total_s"], r["ratio_total"], f"{r['ratio_U_measured']}/{u_pred:.0f}",
                f"{r['ratio_lse_measured']}/{lse_pred:.0f}")
        print("  ".join(f"{str(v):>14}" for v in vals))
    print(f"pocket teacher: phases sum to {base['total_s']} s; the attribute() call took {base['attribute_call_s']} s")
    print("U x shapes / lse x shapes: measured ratio to the pocket teacher / the ratio of the operation counts")
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
