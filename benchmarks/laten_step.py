"""Wall time and peak memory of one LaTen alignment step on the pocket pair.

    .venv/bin/python benchmarks/laten_step.py [--preset default] [--task pocket-math] [--repeat 3]
        [--batch 16] [--transfer-rate 0.1] [--device cpu] [--out result.json]

Times, separately: locating (attribution of one example in teacher and student, no cache,
plus slicing), and the alignment step proper (translator forward, functional injection,
student forward + backward on the P-example batch, AdamW step), median over ``--repeat``
steps on successive extract examples. Memory: on CUDA the peak allocated bytes of the step;
on the CPU the process's peak resident set size before and after the steps (ru_maxrss), next
to :func:`pktlib.laten.memory_estimate` for the same pair and batch.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="default")
    ap.add_argument("--task", default="pocket-math")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--transfer-rate", type=float, default=0.1)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from pktlib import zoo
    from pktlib.data import load_task
    from pktlib.hypernet import Translator, TranslatorConfig
    from pktlib.laten import (LatenConfig, _align_examples, _batch, _make_optim, alignment_step, check_pair, locate,
                              memory_estimate)
    from pktlib.models import load_model

    pair = zoo.pocket_pair(preset=args.preset, progress=False)
    teacher, t_tok = load_model(pair.teacher, device=args.device)
    student, s_tok = load_model(pair.student, device=args.device)
    ts, ss = check_pair(teacher, student)
    student.requires_grad_(False)
    extract, align = load_task(args.task, "extract"), load_task(args.task, "align")
    cfg = LatenConfig(task=args.task, steps=args.repeat, schedule_steps=max(len(extract), args.repeat),
                      transfer_rate=args.transfer_rate, align_batch=args.batch)
    translator = Translator(TranslatorConfig(ts.hidden_size, ss.hidden_size),
                            generator=torch.Generator().manual_seed(0)).to(args.device)
    opt, sched = _make_optim(translator, cfg)
    cuda = args.device.startswith("cuda")
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    locate_s, step_s, peak_cuda = [], [], []
    for i in range(args.repeat):
        ex = extract[i]
        t0 = time.perf_counter()
        located = locate(teacher, t_tok, student, s_tok, ex, transfer_rate=args.transfer_rate)
        locate_s.append(time.perf_counter() - t0)
        batch = _align_examples(ex, align, cfg, i + 1)
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        stats = alignment_step(translator, opt, sched, located, student, s_tok, batch, cfg)
        if cuda:
            torch.cuda.synchronize()
            peak_cuda.append(torch.cuda.max_memory_allocated() / 2**20)
        step_s.append(stats["step_s"])
    rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    est = memory_estimate(ts, ss, dtype="fp32" if next(student.parameters()).dtype == torch.float32 else "bf16",
                          batch=args.batch, seq_len=int(_batch(batch, s_tok, cfg, "cpu")["input_ids"].shape[1]),
                          transfer_rate=args.transfer_rate)
    result = {
        "preset": args.preset, "task": args.task, "device": args.device, "threads": torch.get_num_threads(),
        "teacher": ts.to_dict(), "student": ss.to_dict(), "batch": args.batch, "transfer_rate": args.transfer_rate,
        "locate_s_median": statistics.median(locate_s), "step_s_median": statistics.median(step_s),
        "locate_s": locate_s, "step_s": step_s,
        "peak_rss_mb_before_steps": round(rss_before, 1), "peak_rss_mb_after_steps": round(rss_after, 1),
        "peak_cuda_mb": max(peak_cuda) if peak_cuda else None,
        "estimate_mb": {k: round(v * 1024, 2) for k, v in est.table()},
    }
    print(json.dumps(result, indent=2))
    if args.out:
        from pktlib.records import write_json

        write_json(args.out, result)


if __name__ == "__main__":
    main()
