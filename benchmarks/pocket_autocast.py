"""Benchmark of the pocket pair's training step: float32 against bf16 autocast, per model.

    .venv/bin/python benchmarks/pocket_autocast.py [--preset default] [--steps 8] [--repeats 3]

Why it exists: ``ModelConfig.autocast`` is a per-model choice in the default preset (the
teacher trains with bf16 matmuls, the student in float32). This script measures, in one run and
side by side, one training step of each model of ``--preset`` with random weights in float32
and under bf16 autocast, on a base batch (packed ``seq_len`` blocks) and a chat batch (shorter,
padded rows, as the chat stage has), and prints the speed-up per model and batch kind.

Each setting runs ``--steps`` steps after one warm-up step, ``--repeats`` times in alternation
(float32, bf16, float32, ...), and the best repeat counts: this machine's speed drifts by ~10%
within a day. Nothing is downloaded or read from the pair's cache: the batches are random
tokens of the stage's shape, which is what the step time depends on.
"""
from __future__ import annotations

import argparse
import sys

import torch

from pktlib import zoo


def _batches(cfg: zoo.PairConfig, kind: str, n: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """``n`` batches like the stage's: full blocks (base) or padded rows of ~60% length (chat)."""
    g = torch.Generator().manual_seed(seed)
    bs, t = cfg.base.batch_size, cfg.seq_len
    out = []
    for _ in range(n):
        x = torch.randint(3, cfg.vocab_size, (bs, t), generator=g)  # (B, T)
        if kind == "base":
            out.append({"input_ids": x, "labels": x.clone()})
            continue
        # the chat stage's rows average ~75 of 128 tokens after length bucketing
        lengths = torch.randint(int(0.5 * t), int(0.7 * t), (bs,), generator=g)
        mask = (torch.arange(t)[None, :] < lengths[:, None]).long()  # (B, T)
        width = int(lengths.max())
        labels = torch.where(mask.bool(), x, torch.full_like(x, -100))
        out.append({"input_ids": x[:, :width], "attention_mask": mask[:, :width], "labels": labels[:, :width]})
    return out


def _step_seconds(model_cfg: zoo.ModelConfig, tokenizer, batches, autocast: str | None, seed: int) -> float:
    model = zoo.build_model(model_cfg, tokenizer, seed=seed)
    train = zoo.TrainConfig(epochs=1.0, batch_size=len(batches[0]["input_ids"]), lr=1e-4)
    zoo.train_stage(model, batches[:1], train, seed=seed, autocast=autocast)  # warm-up
    log = zoo.train_stage(model, batches, train, seed=seed, autocast=autocast)
    return log.seconds / len(batches)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="default", help="pocket-pair preset whose model shapes are timed")
    ap.add_argument("--steps", type=int, default=8, help="timed training steps per setting and repeat")
    ap.add_argument("--repeats", type=int, default=3, help="alternating repeats; the best one counts")
    args = ap.parse_args(argv)
    if args.steps < 1 or args.repeats < 1:
        print(f"error: --steps and --repeats must be >= 1 (got {args.steps}, {args.repeats})", file=sys.stderr)
        return 2
    try:
        cfg = zoo.get_preset(args.preset)
    except zoo.PktError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    # A tokenizer of the preset's vocabulary size; its merges do not matter for step time.
    tokenizer = zoo.train_tokenizer([f"word{i} " * 8 for i in range(4 * cfg.vocab_size)], cfg.vocab_size)
    print(f"preset {args.preset}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{args.steps} steps x best of {args.repeats}")
    print(f"{'model':<8} {'batch':<5} {'float32 ms':>11} {'bf16 ms':>8} {'speed-up':>9}   preset setting")
    for role in ("teacher", "student"):
        model_cfg = getattr(cfg, role)
        for kind in ("base", "chat"):
            batches = _batches(cfg, kind, args.steps, seed=0)
            best = {None: float("inf"), "bfloat16": float("inf")}
            for _ in range(args.repeats):
                for dtype in best:
                    best[dtype] = min(best[dtype], _step_seconds(model_cfg, tokenizer, batches, dtype, seed=0))
            print(f"{role:<8} {kind:<5} {1e3 * best[None]:>11.0f} {1e3 * best['bfloat16']:>8.0f} "
                  f"{best[None] / best['bfloat16']:>8.2f}x   {model_cfg.autocast or 'float32'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
