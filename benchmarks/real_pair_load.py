"""Benchmark: loading the real pair's converted checkpoints against loading their GGUF files.

    .venv/bin/python benchmarks/real_pair_load.py [--models qwen2.5-coder-0.5b-instruct ...]

Why it exists: ``make real-pair`` converts each Q4_K_M GGUF file once into float32
safetensors because transformers dequantises a GGUF file (and parses its 151k-token
vocabulary) on every load. The goal is a load at least 10x faster. Per model, in one run and
side by side, this times ``pktlib.models.load_model`` (model + tokenizer, wall clock) on the
converted folder, then on the ``.gguf`` file, then on the converted folder again. The first
converted load may find its file cold in the page cache, the second finds it warm: both
speed-ups are printed, and the goal is judged on the slower (colder) one. It then checks that the two loads are the same model: equal logits on a
prompt and the same greedy completion of "The capital of France is", and that the converted
tokenizer carries the chat template. Only one model is held in memory at a time.

Needs the real pair in the cache (``make real-pair``, with the ``.gguf`` files kept);
without it the script says so and exits 0.
"""
from __future__ import annotations

import argparse
import gc
import sys
import time

import torch

from pktlib.fetch import FETCH_SETS, converted_dir, gguf_path
from pktlib.models import load_model

PROMPT = "The capital of France is"


def _timed_load(source):
    t0 = time.perf_counter()
    model, tok = load_model(source)
    return model, tok, time.perf_counter() - t0


def _probe(model, tok) -> tuple[torch.Tensor, str]:
    ids = tok(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits[0, -1]  # (vocab,)
        out = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
    return logits, tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=list(FETCH_SETS["qwen2.5-coder"]), help="models to time")
    args = ap.parse_args(argv)
    missing = [n for n in args.models if not (gguf_path(n).is_file() and (converted_dir(n) / "config.json").is_file())]
    if missing:
        print(f"skipped: {', '.join(missing)} not in the cache with its .gguf file; run `make real-pair` first")
        return 0
    rows = []
    for name in args.models:
        print(f"== {name}", flush=True)
        model, tok, conv1 = _timed_load(converted_dir(name))
        c_logits, c_text = _probe(model, tok)
        template = tok.chat_template
        chat = tok.apply_chat_template([{"role": "user", "content": "Write hello world in Python."}],
                                       tokenize=False, add_generation_prompt=True)
        del model
        gc.collect()
        model, tok, gguf_s = _timed_load(gguf_path(name))
        g_logits, g_text = _probe(model, tok)
        del model
        gc.collect()
        model, tok, conv2 = _timed_load(converted_dir(name))
        del model
        gc.collect()
        slow, fast = max(conv1, conv2), min(conv1, conv2)
        equal = torch.equal(c_logits, g_logits)
        print(f"load GGUF {gguf_s:7.1f} s   converted {conv1:6.1f} s (first) / {conv2:6.1f} s (again)   "
              f"speed-up {gguf_s / slow:6.1f}x (slower load) / {gguf_s / fast:6.1f}x (faster)")
        print(f"logits equal: {equal}   greedy completion of {PROMPT!r}: converted {c_text!r}, GGUF {g_text!r}")
        print(f"chat template: {'present' if template else 'MISSING'}; a user turn renders as {chat!r}")
        rows.append((name, gguf_s, slow, fast, equal and c_text == g_text and bool(template)))
    print("\nmodel                              GGUF s  converted s (slower/faster)  speed-up  same model + template")
    for name, g, c, f, ok in rows:
        print(f"{name:<34} {g:7.1f} {c:12.1f} / {f:6.1f}    {g / c:6.1f}x-{g / f:.0f}x  {ok}")
    worst = min(g / c for _, g, c, _, _ in rows)
    print(f"goal >= 10x: {'met' if worst >= 10 else 'NOT met'} (worst {worst:.1f}x)")
    return 0 if all(ok for *_, ok in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
