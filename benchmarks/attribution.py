"""Benchmark of pktlib.attribution: speed against two slower implementations, and peak memory.

Speed (default mode)::

    .venv/bin/python benchmarks/attribution.py [--preset default] [--task pocket-math] [--n 32]
        [--threads 1] [--random] [--out results.json]

attributes ``--n`` extract examples with the pocket teacher (``--random``: random weights in
the preset teacher's shape, for when that preset is not built yet) three ways, in one run:

* ``vectorised``: :func:`pktlib.attribution.attribute` (U = E diag(g) W shared across examples,
  chunked log-sum-exp, batched forward passes);
* ``per_layer``: the original code's structure: one example at a time, all neurons of a layer
  through the unembedding together as an (N, d) batch, then Python bookkeeping per neuron
  (a list of ``("layer_neuron", score)`` entries, sorted, parsed back and accumulated);
* ``one_neuron``: the definition taken literally: one neuron at a time, a full softmax each.

It times the library call end to end, the forward passes (batched, and one example at a time
as the references run them), and the scoring alone of all three on the same recorded vectors,
and reports end-to-end and scoring-only speed-ups in wall-clock and process CPU time (CPU time
is the steadier figure on a shared machine). The three must agree: the script prints the
largest relative difference between them.

Memory (``--memory``): peak resident memory of attributing one example on a 7B-shaped one-layer
Llama with random weights (hidden 4096, FFN 11008, 32 heads, a 32000-token unembedding)::

    .venv/bin/python benchmarks/attribution.py --memory

Peak RSS is sampled from /proc/self/statm during the call and also read from getrusage
(the process's lifetime peak, model construction included).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pktlib import activations  # noqa: E402
from pktlib import attribution as A  # noqa: E402
from pktlib.lens import LogitLens  # noqa: E402
from pktlib.models import spec  # noqa: E402

KEYS = ("ffn", "attn", "ffn_layers", "attn_layers")


# ------------------------------------------------------------------------ the two slower ways
# Both score vectors recorded by one forward pass per example (A._record on a batch of one),
# exactly as the original code runs the model on one example at a time.


def record_each(model, tokenizer, pairs):
    """One forward pass per example: the recorded vectors of each, in order."""
    s = spec(model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    dev = next(model.parameters()).device
    return [activations.record(model, s, [ids], pad, dev) for ids in A._encode(tokenizer, pairs)]


def _zero_scores(s) -> dict[str, torch.Tensor]:
    """Accumulators shaped like an Attribution's four summed tensors."""
    L = s.n_layers
    return {"ffn": torch.zeros(L, s.intermediate_size), "attn": torch.zeros(L, s.attn_size),
            "ffn_layers": torch.zeros(L), "attn_layers": torch.zeros(L)}


@torch.no_grad()
def per_layer_original(model, recs, normaliser="rms"):
    """The original code's structure: one example at a time, all neurons of a layer through the
    unembedding together as an (N, d) batch, then Python bookkeeping per neuron (a list of
    ``("layer_neuron", score)`` entries, sorted, parsed back and accumulated one by one)."""
    s = spec(model)
    lens = LogitLens.of(model, s)
    rho_fn = A.NORMALISERS[normaliser]
    L = s.n_layers
    out = _zero_scores(s)
    for rec in recs:
        rho = rho_fn(rec.h_final, s.norm_eps)  # (1,)
        t = rec.target
        for kind, coef_key, module in (("ffn", "ffn_coef", "down_proj"), ("attn", "attn_coef", "o_proj")):
            entries = []
            for l in range(L):
                base = rec.x[:, l] + rec.attn_out[:, l] if kind == "ffn" else rec.x[:, l]  # (1, d)
                W = s.weight(model, l, module)  # (d, N)
                sub = (getattr(rec, coef_key)[0, l] * W).T  # (N, d): every neuron's sub-value
                n = sub.shape[0]
                lp = torch.log_softmax(lens.logits(sub + base, rho.expand(n)), -1)[:, t[0]]
                inc = lp - lens.logprob(base, rho, t)
                for i, v in enumerate(inc):
                    entries.append((f"{l}_{i}", v.item()))
            entries.sort(key=lambda e: e[1], reverse=True)
            for name, v in entries:
                l, i = map(int, name.split("_"))
                out[kind][l, i] += v
        for l in range(L):
            x, r = rec.x[:, l], rec.x[:, l] + rec.attn_out[:, l]
            out["attn_layers"][l] += (lens.logprob(r, rho, t) - lens.logprob(x, rho, t)).item()
            out["ffn_layers"][l] += (lens.logprob(r + rec.ffn_out[:, l], rho, t) - lens.logprob(r, rho, t)).item()
    return out


@torch.no_grad()
def one_neuron(model, recs, normaliser="rms"):
    """One neuron at a time, a full softmax over the vocabulary each time."""
    s = spec(model)
    lens = LogitLens.of(model, s)
    rho_fn = A.NORMALISERS[normaliser]
    L = s.n_layers
    out = _zero_scores(s)

    def logp(v, rho, t):
        return torch.log_softmax(lens.logits(v[None], rho), -1)[0, t]

    for rec in recs:
        rho, t = rho_fn(rec.h_final, s.norm_eps), int(rec.target[0])
        for l in range(L):
            x, r = rec.x[0, l], rec.x[0, l] + rec.attn_out[0, l]
            W_d, W_o = s.weight(model, l, "down_proj"), s.weight(model, l, "o_proj")
            base_x, base_r = logp(x, rho, t), logp(r, rho, t)
            for i in range(s.intermediate_size):
                out["ffn"][l, i] += logp(r + rec.ffn_coef[0, l, i] * W_d[:, i], rho, t) - base_r
            for j in range(s.attn_size):
                out["attn"][l, j] += logp(x + rec.attn_coef[0, l, j] * W_o[:, j], rho, t) - base_x
            out["attn_layers"][l] += base_r - base_x
            out["ffn_layers"][l] += logp(r + rec.ffn_out[0, l], rho, t) - base_r
    return out


@torch.no_grad()
def vectorised_scoring(model, recs, normaliser="rms", chunk_size=4096):
    """The library's scoring step on recorded vectors (all examples in one group)."""
    s = spec(model)
    rec = activations.Recorded.cat(recs)
    rho = A.NORMALISERS[normaliser](rec.h_final, s.norm_eps)
    per = A._score_group(model, s, LogitLens.of(model, s), rec, rho, chunk_size, None)
    return {k: v.sum(0) for k, v in per.items()}


def _rel_diff(a: dict, b: dict) -> float:
    return max(float((a[k] - b[k]).abs().max() / b[k].abs().max().clamp_min(1e-12)) for k in KEYS)


def _timed(fn, *args, **kwargs):
    """(result, wall seconds, process CPU seconds): CPU time is steadier on a shared machine."""
    c0, t0 = time.process_time(), time.perf_counter()
    res = fn(*args, **kwargs)
    return res, time.perf_counter() - t0, time.process_time() - c0


# ------------------------------------------------------------------------ speed


def speed(args) -> dict:
    from pktlib.data import load_task, prompt_answer_pairs
    from pktlib.models import load_model
    from pktlib.zoo import pair_dir, pocket_pair

    if args.shape:
        # Any Llama shape with random weights, to see how the speed-up scales with width and vocabulary.
        import transformers

        L, d, N, H, V = (int(x) for x in args.shape.split(","))
        tok = load_model(pocket_pair(preset="tiny").teacher)[1]
        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=V, hidden_size=d, intermediate_size=N, num_hidden_layers=L, num_attention_heads=H,
            tie_word_embeddings=False)).eval()
        teacher = f"random weights, shape L={L} d={d} N={N} heads={H} V={V}"
    elif args.random:
        # The preset's teacher shape with random weights (timings depend on shapes, not weights),
        # with the tokenizer of the (cheaper) tiny pair: for when the preset is not built yet.
        import transformers

        from pktlib.zoo import get_preset

        cfg = get_preset(args.preset)
        tok = load_model(pocket_pair(preset="tiny").teacher)[1]
        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=cfg.vocab_size, hidden_size=cfg.teacher.hidden_size,
            intermediate_size=cfg.teacher.intermediate_size, num_hidden_layers=cfg.teacher.n_layers,
            num_attention_heads=cfg.teacher.n_heads, head_dim=cfg.teacher.head_dim,
            tie_word_embeddings=False)).eval()
        teacher = f"random weights, shape of the {args.preset!r} teacher"
    else:
        if not (pair_dir(args.preset) / "build.json").exists():
            print(f"the {args.preset!r} pocket pair is not built yet: building it first (see pktlib.zoo)", flush=True)
        pair = pocket_pair(preset=args.preset)
        model, tok = load_model(pair.teacher)
        teacher = str(pair.teacher)
    pairs = prompt_answer_pairs(load_task(args.task, "extract", limit=args.n))
    s = spec(model)
    print(f"teacher {teacher} ({args.preset}): {s.n_layers} layers, d={s.hidden_size}, "
          f"N={s.intermediate_size}, A={s.attn_size}, V={s.vocab_size}; {len(pairs)} {args.task} examples; "
          f"{torch.get_num_threads()} threads", flush=True)
    A.attribute(model, tok, pairs[:2])  # warm-up (allocator, kernels)
    res: dict = {"preset": args.preset, "teacher": teacher, "task": args.task, "n_examples": len(pairs),
                 "threads": torch.get_num_threads(), "spec": s.to_dict(), "batch_size": args.batch_size}

    def report(name, wall, cpu):
        res[f"{name}_wall_s"], res[f"{name}_cpu_s"] = wall, cpu
        print(f"{name:>28}: {wall:8.3f} s wall {cpu:8.3f} s CPU", flush=True)

    # end to end, the library call
    fast, w, c = _timed(A.attribute, model, tok, pairs, batch_size=args.batch_size, chunk_size=args.chunk_size)
    fast = {k: getattr(fast, k) for k in KEYS}
    report("attribute (end to end)", w, c)
    # the forward passes: batched (the library) and one example at a time (the references)
    _, w, c = _timed(lambda: [activations.record(model, s, q, tok.pad_token_id or 0, "cpu") for q in
                              [A._encode(tok, pairs[i:i + args.batch_size]) for i in range(0, len(pairs), args.batch_size)]])
    report("forward, batched", w, c)
    recs, w, c = _timed(record_each, model, tok, pairs)
    report("forward, one example each", w, c)
    # scoring only, all from the same recorded vectors
    vec, w, c = _timed(vectorised_scoring, model, recs, chunk_size=args.chunk_size)
    report("scoring: vectorised", w, c)
    per, w, c = _timed(per_layer_original, model, recs)
    report("scoring: per-layer (original)", w, c)
    res["max_rel_diff_per_layer"] = _rel_diff(fast, per)
    res["max_rel_diff_scoring"] = _rel_diff(vec, per)
    if not args.skip_one_neuron:
        one, w, c = _timed(one_neuron, model, recs)
        report("scoring: one neuron at a time", w, c)
        res["max_rel_diff_one_neuron"] = _rel_diff(fast, one)
    for clock in ("wall", "cpu"):
        fwd1 = res[f"forward, one example each_{clock}_s"]
        ours = res[f"attribute (end to end)_{clock}_s"]
        sc = res[f"scoring: vectorised_{clock}_s"]
        res[f"speedup_end_to_end_vs_per_layer_{clock}"] = (fwd1 + res[f"scoring: per-layer (original)_{clock}_s"]) / ours
        res[f"speedup_scoring_vs_per_layer_{clock}"] = res[f"scoring: per-layer (original)_{clock}_s"] / sc
        # Both ways must run the model forward: even free scoring could not beat this end to end.
        res[f"end_to_end_bound_if_scoring_were_free_{clock}"] = (
            (fwd1 + res[f"scoring: per-layer (original)_{clock}_s"]) / res[f"forward, batched_{clock}_s"])
        if not args.skip_one_neuron:
            res[f"speedup_end_to_end_vs_one_neuron_{clock}"] = (fwd1 + res[f"scoring: one neuron at a time_{clock}_s"]) / ours
            res[f"speedup_scoring_vs_one_neuron_{clock}"] = res[f"scoring: one neuron at a time_{clock}_s"] / sc
    for k, v in res.items():
        if k.startswith(("speedup", "max_rel", "end_to_end_bound")):
            print(f"{k}: {v:.3g}")
    return res


# ------------------------------------------------------------------------ memory


def _rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class _PeakRSS:
    """Samples the resident set size every few milliseconds in a background thread."""

    def __init__(self, every: float = 0.005):
        self.every, self.peak, self._stop = every, _rss_bytes(), threading.Event()

    def __enter__(self):
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_bytes())
            time.sleep(self.every)

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, _rss_bytes())


def memory(args) -> dict:
    import transformers

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from conftest import make_tokenizer

    tok = make_tokenizer()
    from pktlib.models import reference_config

    config = reference_config("Llama-2-7b-chat")  # public shape, no download
    config.num_hidden_layers = 1
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()  # random weights (std 0.02), rotary buffers set
    n_params = sum(p.numel() for p in model.parameters())
    # the byte-level test tokenizer has 384 ids < 32000, so any text maps into the vocabulary
    pairs = [("<|user|>\nWhat is the capital of France?\n\n<|assistant|>\n", "The answer is: Paris.")]
    before = _rss_bytes()
    with _PeakRSS() as peak:
        attr, secs, _ = _timed(A.attribute, model, tok, pairs, chunk_size=args.chunk_size)
    res = {"shape": "7B-like one layer: d=4096, N=11008, 32 heads, V=32000", "parameters": n_params,
           "chunk_size": args.chunk_size, "seconds": secs,
           "rss_before_gb": before / 2**30, "peak_rss_during_gb": peak.peak / 2**30,
           "attribution_extra_gb": (peak.peak - before) / 2**30,
           "ru_maxrss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
           "finite": bool(torch.isfinite(attr.ffn).all() and torch.isfinite(attr.attn).all())}
    print(json.dumps(res, indent=2))
    assert res["ru_maxrss_gb"] <= 16, f"peak RSS {res['ru_maxrss_gb']:.2f} GB exceeds 16 GB"
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="default", help="pocket pair preset (default, tiny)")
    p.add_argument("--task", default="pocket-math")
    p.add_argument("--n", type=int, default=32, help="extract examples")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--chunk-size", type=int, default=4096)
    p.add_argument("--skip-one-neuron", action="store_true", help="skip the slowest reference")
    p.add_argument("--random", action="store_true", help="random weights in the preset teacher's shape")
    p.add_argument("--shape", help="random weights in this Llama shape: LAYERS,HIDDEN,FFN,HEADS,VOCAB")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    p.add_argument("--memory", action="store_true", help="peak memory on a 7B-shaped one-layer model instead")
    p.add_argument("--out", type=Path, help="write the results as JSON here")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    res = memory(args) if args.memory else speed(args)
    if args.out:
        from pktlib.records import write_json

        write_json(args.out, res)


if __name__ == "__main__":
    main()
