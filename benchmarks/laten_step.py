"""Wall time and peak memory of LaTen alignment steps on the pocket pair.

    .venv/bin/python benchmarks/laten_step.py [--preset default] [--task pocket-math] [--repeat 3]
        [--batch 16] [--transfer-rate 0.1] [--device cpu] [--out result.json]

Runs ``--repeat`` steps of :func:`pktlib.laten.train` (in a temporary run folder, so no
attribution is cached) and reads from its log, separately: locating (attribution of one example
in teacher and student, plus slicing; ``attribution_s``), and the alignment step proper
(translator forward, functional injection, student forward + backward on the P-example batch,
AdamW step; ``step_s``), median over the steps on successive extract examples. Memory: on CUDA
the peak allocated bytes over the steps; on the CPU the process's peak resident set size before
and after them (ru_maxrss), next to :func:`pktlib.laten.memory_estimate` for the same pair and batch.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import tempfile

import torch

from pktlib import zoo
from pktlib.data import load_task
from pktlib.laten import check_pair, memory_estimate, train
from pktlib.laten.method import _align_examples, _batch
from pktlib.models import load_model
from pktlib.records import write_json


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

    pair = zoo.pocket_pair(preset=args.preset, progress=False)
    teacher, t_tok = load_model(pair.teacher, device=args.device)
    student, s_tok = load_model(pair.student, device=args.device)
    ts, ss = check_pair(teacher, student)
    extract, align = load_task(args.task, "extract"), load_task(args.task, "align")
    cuda = args.device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    with tempfile.TemporaryDirectory() as run_dir:
        res = train((teacher, t_tok), (student, s_tok), args.task, steps=args.repeat, transfer_rate=args.transfer_rate,
                    align_batch=args.batch, seed=0, out_dir=run_dir, progress=False, extract=extract, align=align)
    if cuda:
        torch.cuda.synchronize()
    rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    locate_s = [r["attribution_s"] for r in res.log]
    step_s = [r["step_s"] for r in res.log]
    batch = _align_examples(extract[args.repeat - 1], align, res.config, args.repeat)
    est = memory_estimate(ts, ss, dtype="fp32" if next(student.parameters()).dtype == torch.float32 else "bf16",
                          batch=args.batch, seq_len=int(_batch(batch, s_tok, res.config, "cpu")["input_ids"].shape[1]),
                          transfer_rate=args.transfer_rate)
    result = {
        "preset": args.preset, "task": args.task, "device": args.device, "threads": torch.get_num_threads(),
        "teacher": ts.to_dict(), "student": ss.to_dict(), "batch": args.batch, "transfer_rate": args.transfer_rate,
        "locate_s_median": statistics.median(locate_s), "step_s_median": statistics.median(step_s),
        "locate_s": locate_s, "step_s": step_s,
        "peak_rss_mb_before_steps": round(rss_before, 1), "peak_rss_mb_after_steps": round(rss_after, 1),
        "peak_cuda_mb": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
        "estimate_mb": {k: round(v * 1024, 2) for k, v in est.table()},
    }
    print(json.dumps(result, indent=2))
    if args.out:
        write_json(args.out, result)


if __name__ == "__main__":
    main()
