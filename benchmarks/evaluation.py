"""Throughput of the two generation backends of pktlib.evaluation, measured in one run.

    .venv/bin/python benchmarks/evaluation.py [--preset default] [--model DIR] [--task pocket-math]
        [--limit 64] [--batch-size 16] [--max-new-tokens N] [--out result.json]

Scores the pocket student (``--model`` overrides it) on the first ``--limit`` test examples of
``--task`` with the Hugging Face backend and then with vLLM, and prints for each the examples
per second of generation (prompt tokenisation, generation and decoding; scoring and the vLLM
engine start are timed separately), the score, and the vLLM/HF throughput ratio. Both backends
are warmed up on two prompts first. The vLLM engine runs in float32, as for the agreement test.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="default", help="pocket-pair preset whose student is measured")
    ap.add_argument("--model", default=None, help="a model directory instead of the pocket student")
    ap.add_argument("--task", default="pocket-math")
    ap.add_argument("--limit", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=16, help="hf backend batch size")
    ap.add_argument("--max-new-tokens", type=int, default=None)
    ap.add_argument("--out", default=None, help="write the figures as JSON (atomically)")
    args = ap.parse_args()

    import torch

    from pktlib.data import format_prompt, load_task
    from pktlib.evaluation import evaluate, free_engines, make_generator, stop_strings
    from pktlib.records import write_json

    if args.model:
        model_dir = args.model
    else:
        from pktlib.zoo import pocket_pair

        model_dir = str(pocket_pair(preset=args.preset).student)
    warm = [format_prompt(ex.messages) for ex in load_task(args.task, limit=2)]
    figures = {"model": model_dir, "task": args.task, "limit": args.limit, "torch_threads": torch.get_num_threads(),
               "cpu_count": os.cpu_count()}
    for backend in ("hf", "vllm"):
        t0 = time.perf_counter()
        gen = make_generator(model_dir, backend, batch_size=args.batch_size)
        start_s = time.perf_counter() - t0
        gen.generate(warm, 8, stop_strings(gen.tokenizer))
        res = evaluate(model_dir, args.task, backend=backend, limit=args.limit, generator=gen,
                       max_new_tokens=args.max_new_tokens, progress=False)
        figures[backend] = {"start_s": round(start_s, 2), "generate_s": res.generate_s,
                            "examples_per_s": res.examples_per_s, "score": res.score, "n": res.n,
                            "max_new_tokens": res.max_new_tokens,
                            "completions": [r.completion for r in res.records]}
        print(f"{backend:>5}: start {start_s:6.1f} s, generation {res.generate_s:7.2f} s for {res.n} examples "
              f"= {res.examples_per_s:7.2f} examples/s; score {res.score:.2f}")
    free_engines()
    hf, vl = figures["hf"], figures["vllm"]
    figures["ratio_vllm_over_hf"] = round(vl["examples_per_s"] / hf["examples_per_s"], 2)
    figures["agreement"] = sum(a == b for a, b in zip(hf["completions"], vl["completions"])) / len(hf["completions"])
    print(f"vllm / hf throughput ratio: {figures['ratio_vllm_over_hf']:.2f}x; "
          f"identical completions: {100 * figures['agreement']:.1f}%")
    if args.out:
        write_json(args.out, figures)


if __name__ == "__main__":
    main()
