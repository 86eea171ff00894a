"""Seeking's best sub-matrix search: all windows at once vs the original nested Python loop.

The shape is a Llama-2-13B -> 7B FFN weight: a 13824 x 5120 sensitivity matrix, windows of
11008 x 4096, i.e. 2817 x 1025 = 2,887,425 candidate windows.

The original code (maszhongming/ParaKnowTransfer, ``max_sens_submatrix``) builds a float32
summed-area table with two cumsums, then visits every window in a Python double loop,
reading four table corners per window and keeping the first strict maximum. Running all
2.9M iterations takes minutes, so this script times the table plus a sample of rows of
the loop (every column of each sampled row), and extrapolates the loop linearly to all
windows: per-window cost x number of windows. The loop is written here from the
description above (same structure: a helper call with two corner tuples per window, four
0-d tensor reads, a tensor comparison), not copied.

    .venv/bin/python benchmarks/seeking.py [--rows 16] [--repeats 3] [--threads N] [--json out.json]

Prints both times and their ratio; ``--json`` also writes them.
"""
from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np
import torch

from pktlib.seeking import best_submatrix, window_sums

from pktlib.models import reference_spec  # noqa: E402

_T, _S = reference_spec("Llama-2-13b-chat"), reference_spec("Llama-2-7b-chat")
R, C = _T.intermediate_size, _T.hidden_size  # Llama-2-13B FFN: intermediate x hidden
H, W = _S.intermediate_size, _S.hidden_size  # Llama-2-7B


def _corner_sum(table: torch.Tensor, top_left: tuple[int, int], bottom_right: tuple[int, int]) -> torch.Tensor:
    """One window's sum from the summed-area table: four corners, as the original's helper."""
    total = table[bottom_right[0], bottom_right[1]]
    up = table[top_left[0] - 1, bottom_right[1]] if top_left[0] > 0 else 0
    left = table[bottom_right[0], top_left[1] - 1] if top_left[1] > 0 else 0
    corner = table[top_left[0] - 1, top_left[1] - 1] if top_left[0] > 0 and top_left[1] > 0 else 0
    return total - up - left + corner


def loop_sample(scores: torch.Tensor, shape: tuple[int, int], rows: list[int]
                ) -> tuple[float, list[float], int, tuple[int, int], float]:
    """The original algorithm's structure on the sampled window rows.

    Like the original: the loop runs over bottom-right corners, builds the two corner tuples
    and calls a helper per window, which indexes the float32 table four times (0-d tensors).
    Returns (table seconds, loop seconds per sampled row, windows visited, best (row, col)
    among them, best sum).
    """
    h, w = shape
    t0 = time.perf_counter()
    sat = torch.cumsum(torch.cumsum(scores, dim=0), dim=1)  # float32, as the original
    t_table = time.perf_counter() - t0
    best, arg, n = -float("inf"), (0, 0), 0
    per_row = []  # seconds per window row: the minimum is the least disturbed by other load
    for r in rows:  # top-left row of the window
        t0 = time.perf_counter()
        i = r + h - 1  # bottom row
        for j in range(w - 1, scores.shape[1]):  # right column
            top_left = (i - h + 1, j - w + 1)
            s = _corner_sum(sat, top_left, (i, j))
            if s > best:
                best, arg = s, top_left
            n += 1
        per_row.append(time.perf_counter() - t0)
    return t_table, per_row, n, arg, float(best)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=16, help="window rows of the loop to time (each: 1025 windows)")
    ap.add_argument("--repeats", type=int, default=3, help="repeats of the vectorised search (best time kept)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    g = torch.Generator().manual_seed(args.seed)
    scores = torch.rand(R, C, generator=g)  # nonnegative, like summed |theta * grad|
    n_windows = (R - H + 1) * (C - W + 1)

    def vectorised() -> list[float]:
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            best_submatrix(scores, (H, W))
            times.append(time.perf_counter() - t0)
        return times

    # Both sides are timed twice, interleaved, so a burst of load on this shared machine
    # hits both; the minimum of each is compared (and the medians, for the record).
    n_rows = R - H + 1
    rows = sorted({round(k * (n_rows - 1) / max(1, args.rows - 1)) for k in range(args.rows)})
    half = max(1, len(rows) // 2)
    vec = vectorised()
    t_table, per_row, n_visited, loop_arg, loop_best = loop_sample(scores, (H, W), rows[:half])
    vec += vectorised()
    t_table2, per_row2, n2, arg2, best2 = loop_sample(scores, (H, W), rows[half:])
    per_row += per_row2
    n_visited += n2
    if best2 > loop_best:
        loop_arg, loop_best = arg2, best2
    t_table = min(t_table, t_table2)
    pos = best_submatrix(scores, (H, W))
    best_t = min(vec)
    cols = C - W + 1
    per_window = min(per_row) / cols
    loop_total = t_table + per_window * n_windows
    per_window_med = float(np.median(per_row)) / cols
    ratio_median = (t_table + per_window_med * n_windows) / float(np.median(vec))

    # The two agree on the sampled windows (vectorised sums restricted to those rows).
    sums = window_sums(scores, (H, W))
    sub = sums[rows]
    k = int(torch.argmax(sub))
    vec_arg = (rows[k // sub.shape[1]], k % sub.shape[1])
    agree = vec_arg == loop_arg

    ratio = loop_total / best_t
    res = {
        "shape": [R, C], "window": [H, W], "windows": n_windows,
        "vectorised_s": round(best_t, 4), "vectorised_best": list(pos),
        "loop_table_s": round(t_table, 4), "loop_windows_timed": n_visited,
        "loop_us_per_window": round(per_window * 1e6, 3), "loop_extrapolated_s": round(loop_total, 1),
        "ratio": round(ratio, 1), "ratio_of_medians": round(ratio_median, 1), "sample_agrees": agree,
        "vectorised_times_s": [round(t, 4) for t in vec],
        "torch_threads": torch.get_num_threads(), "cpus": os.cpu_count(), "machine": platform.processor() or platform.machine(),
        "load_avg_1min": os.getloadavg()[0],
    }
    print(f"best_submatrix {R}x{C} -> {H}x{W} ({n_windows:,} windows): {best_t:.3f} s, top-left {pos}")
    print(f"original loop: table {t_table:.3f} s + {per_window * 1e6:.2f} us/window x {n_windows:,} windows "
          f"(timed {n_visited:,}) = {loop_total:.1f} s (extrapolated)")
    print(f"sampled rows: loop best {loop_arg}, vectorised best {vec_arg} -> {'agree' if agree else 'DISAGREE'}")
    print(f"ratio: {ratio:.0f}x from the best times, {ratio_median:.0f}x from the medians "
          f"(load average {res['load_avg_1min']:.1f} on {res['cpus']} CPUs)")
    if args.json:
        from pktlib.records import write_json

        write_json(args.json, res)


if __name__ == "__main__":
    main()
