"""Benchmark: scoring the real pair with vLLM in float32 against bfloat16, side by side.

    .venv/bin/python benchmarks/vllm_dtype.py [--role student] [--task gsm8k] [--n 20]

Why it exists: every real-pair chapter spends most of its time in vLLM generating answers on
two CPU cores, and the scores default to float32 so that greedy answers match the Hugging Face
backend. CPUs with AMX or AVX512-BF16 run bfloat16 matrix products much faster and read half
the bytes per decoding step. This script scores one model of the real pair on the same seeded
questions (``real_pair.subset_indices``, the chapters' subsets) once per dtype, in one run, each
into its own empty score cache, and prints the wall-clock ratio, the two scores and how many
questions got the same answer text and the same verdict. The paper's evaluator (open-instruct)
runs vLLM with the checkpoint's dtype, bfloat16 for Qwen2.5.

Needs the real pair in the cache (``make real-pair``); without it the script says so and exits 0.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pair", default="qwen2.5-coder-1.5b-0.5b")
    ap.add_argument("--role", default="student", choices=["teacher", "student"])
    ap.add_argument("--task", default="gsm8k")
    ap.add_argument("--n", type=int, default=20, help="questions (the chapters' seeded subset)")
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    args = ap.parse_args()

    from pktlib.errors import PktError
    from pktlib.evaluation.backends import free_engines
    from pktlib.experiments.real_pair import ScoreSettings, score_model, subset_indices
    from pktlib.pairs import get_pair

    try:
        model_dir = getattr(get_pair(args.pair, require=True), args.role)
    except PktError as e:
        print(f"skipped: {e}")
        return 0
    idx = subset_indices(args.task, args.n)
    runs = {}
    for dtype in args.dtypes:
        settings = ScoreSettings(dtype=dtype)
        with tempfile.TemporaryDirectory() as root:
            t0 = time.perf_counter()
            res = score_model(model_dir, args.task, idx, settings=settings,
                              generator=lambda s=settings: s.generator(str(model_dir)), root=root)
            wall = time.perf_counter() - t0
            free_engines()
        runs[dtype] = (res, wall)
        print(f"{dtype:>9}: {args.role} {args.task} {res.n_correct}/{res.n} correct, wall {wall:.0f} s "
              f"(engine start included), generation {res.generate_s:.0f} s", flush=True)
    base, (ref, ref_wall) = args.dtypes[0], runs[args.dtypes[0]]
    for dtype in args.dtypes[1:]:
        res, wall = runs[dtype]
        same_text = sum(a.completion == b.completion for a, b in zip(ref.records, res.records))
        same_verdict = sum(a.correct == b.correct for a, b in zip(ref.records, res.records))
        print(f"{dtype} vs {base}: wall x{ref_wall / wall:.2f} faster, generation x{ref.generate_s / res.generate_s:.2f}; "
              f"same answer text {same_text}/{res.n}, same verdict {same_verdict}/{res.n}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
