"""Running the book at scale (the "Reproduce at scale" chapter): commands and memory.

Nothing here is typed per chapter: the notebook commands are generated from each chapter's
``parameters`` cell (papermill's inspection), every command is checked against the ``pkt``
command-line interface (:func:`check_cli_args`), and the memory estimates are computed from the
models' public configurations (:func:`pktlib.models.reference_spec`, no download).
"""
from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any, Mapping, Sequence

import pandas as pd
import papermill as pm
import typer

from pktlib.cli import app
from pktlib.errors import PktError
from pktlib.laten import memory_estimate
from pktlib.models import ModelSpec, reference_spec

__all__ = ["REAL_PAIRS", "MODEL_PARAMS", "GPU_GIB", "check_cli_args", "chapter_commands", "pkt_commands",
           "cli_commands", "sensitivity_bytes", "memory_table", "memory_reading"]

# The paper's pairs (Table 1 and Table 8) as Hugging Face hub ids; "reference" names their public
# configs in pktlib.models.REFERENCE_CONFIGS.
REAL_PAIRS: dict[str, dict[str, Any]] = {
    "llama2": {
        "teacher": "meta-llama/Llama-2-13b-chat-hf", "student": "meta-llama/Llama-2-7b-chat-hf",
        "teacher_base": "meta-llama/Llama-2-13b-hf", "student_base": "meta-llama/Llama-2-7b-hf",
        "reference": ("Llama-2-13b-chat", "Llama-2-7b-chat"),
    },
    "qwen2.5": {
        "teacher": "Qwen/Qwen2.5-3B-Instruct", "student": "Qwen/Qwen2.5-1.5B-Instruct",
        "teacher_base": "Qwen/Qwen2.5-3B", "student_base": "Qwen/Qwen2.5-1.5B",
        "reference": ("Qwen2.5-3B-Instruct", "Qwen2.5-1.5B-Instruct"),
    },
}
MODEL_PARAMS = ("teacher", "student", "teacher_base", "student_base")
GPU_GIB = 76  # usable memory of one 80 GB GPU
_DTYPE_SHORT = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}


def check_cli_args(args: Sequence[str]) -> None:
    """Raise PktError unless every option of ``pkt ...`` ``args`` is accepted by that ``pkt`` command."""
    cmd = typer.main.get_command(app)
    words = list(args[1:])
    while words and hasattr(cmd, "commands") and words[0] in cmd.commands:
        cmd = cmd.commands[words.pop(0)]
    known = {o for p in cmd.params for o in list(getattr(p, "opts", [])) + list(getattr(p, "secondary_opts", []))}
    if (cmd.context_settings or {}).get("allow_extra_args"):
        known |= {"-p", "--param"}  # `pkt run` takes papermill-style -p NAME VALUE as extra arguments
    unknown = [w for w in words if w.startswith("-") and not w.lstrip("-").replace(".", "").isdigit() and w not in known]
    if unknown:
        raise PktError(f"{shlex.join(args)}: options not accepted by `pkt`: {unknown}")


def chapter_commands(notebook_dir: str | Path, *, pairs: Mapping[str, Mapping[str, Any]] = REAL_PAIRS,
                     tasks: Sequence[str], device: str, dtype: str
                     ) -> tuple[list[dict[str, Any]], dict[str, list[str]]]:
    """(one row per chapter: its parameters and whether it runs at scale, ``{pair: [pkt run ...]}``).

    A chapter runs at scale when its ``parameters`` cell has ``teacher`` and ``student`` (or a
    ``model``); its command passes the pair's models, ``device``/``dtype`` where taken, and for a
    ``task`` parameter the paper's tasks (a chapter whose default is "all") or ``gsm8k``.
    """
    rows, commands = [], {}
    for nb in sorted(Path(notebook_dir).glob("*.ipynb")):
        params = pm.inspect_notebook(str(nb))
        takes = [p for p in MODEL_PARAMS if p in params]
        pairwise = {"teacher", "student"} <= set(takes)
        row = {"chapter": nb.stem, "parameters": ", ".join(params), "runs at scale": pairwise or "model" in params}
        rows.append(row)
        if not row["runs at scale"]:
            continue
        for pair_name, pair in pairs.items():
            args = ["pkt", "run", str(nb), "-o", f"runs/scale/{pair_name}/{nb.stem}.ipynb"]
            for p in takes:
                args += ["-p", p, pair[p]]
            for p, v in (("device", device), ("dtype", dtype)):
                if p in params:
                    args += ["-p", p, v]
            if "task" in params:
                # "all" means the pocket families: at scale, the paper's four tasks interleaved.
                all_tasks = params["task"]["default"].strip(chr(34) + chr(39)) == "all"
                args += ["-p", "task", ",".join(tasks) if all_tasks else "gsm8k"]
            if "model" in params and not pairwise:
                args += ["-p", "model", pair["student"]]
            check_cli_args(args)
            commands.setdefault(pair_name, []).append(shlex.join(args))
    return rows, commands


def pkt_commands(pair_name: str, pair: Mapping[str, Any], task: str, *, device: str) -> list[list[str]]:
    """The command-line runs behind Table 1 for one pair and task: scores, LaTen, Post-Align, unaligned."""
    t, s, root = pair["teacher"], pair["student"], f"runs/{pair_name}/{task}"
    return [
        ["pkt", "eval", s, "--task", task, "--backend", "vllm", "--out", f"{root}/student.json"],
        ["pkt", "eval", t, "--task", task, "--backend", "vllm", "--out", f"{root}/teacher.json"],
        ["pkt", "laten", "train", "--teacher", t, "--student", s, "--task", task, "--out", f"{root}/laten",
         "--device", device],
        ["pkt", "laten", "apply", "--teacher", t, "--student", s, "--translator", f"{root}/laten", "--task", task,
         "--out", f"{root}/laten-injected", "--device", device],
        ["pkt", "eval", f"{root}/laten-injected", "--task", task, "--backend", "vllm", "--out", f"{root}/laten.json"],
        *[["pkt", "postalign", "--student", s, "--teacher", t, "--task", task, "--init", init, "--split", split,
           "--out", f"{root}/postalign-{init}-{split}"]
          for init in ("random", "pissa", "seeking") for split in ("train", "align")],
        ["pkt", "baseline", "unaligned", "--teacher", t, "--student", s, "--task", task, "--layers", "top",
         "--hidden", "pca", "--neurons", "importance", "--out", f"{root}/unaligned-top-pca-importance"],
    ]


def cli_commands(*, pairs: Mapping[str, Mapping[str, Any]] = REAL_PAIRS, tasks: Sequence[str],
                 device: str) -> dict[str, list[str]]:
    """:func:`pkt_commands` for every task of Llama-2 and GSM8K of the other pairs, checked, as shell lines."""
    out: dict[str, list[str]] = {}
    for pair_name, pair in pairs.items():
        for task in (tasks if pair_name == "llama2" else ["gsm8k"]):
            for args in pkt_commands(pair_name, pair, task, device=device):
                check_cli_args(args)
                out.setdefault(pair_name, []).append(shlex.join(args))
    return out


def sensitivity_bytes(teacher: ModelSpec) -> int:
    """Float32 Seeking sensitivity of up, down, v and o for every teacher layer."""
    t = teacher
    return 4 * t.n_layers * (2 * t.hidden_size * t.intermediate_size + t.hidden_size * t.kv_size
                             + t.hidden_size * t.attn_size)


def memory_table(*, pairs: Mapping[str, Mapping[str, Any]] = REAL_PAIRS, dtype: str = "bfloat16") -> pd.DataFrame:
    """Estimated GiB per step (rows) and pair (columns) in ``dtype`` (weights in ``dtype``).

    LaTen's alignment step is :func:`pktlib.laten.memory_estimate`; the analysis chapters hold the
    weights they load, plus the teacher's float32 sensitivity for Seeking.
    """
    if dtype not in _DTYPE_SHORT:
        raise PktError(f"unknown dtype {dtype!r}; expected one of {', '.join(_DTYPE_SHORT)}")
    GiB = 2**30
    rows = []
    for pair_name, pair in pairs.items():
        ts, ss = (reference_spec(n) for n in pair["reference"])
        est = memory_estimate(ts, ss, dtype=_DTYPE_SHORT[dtype])
        tw, sw, sens = est.teacher_weights, est.student_weights, sensitivity_bytes(ts)
        for step, b in (("LaTen alignment step (one device)", est.total),
                        ("Ethological similarity (teacher + student)", tw + sw),
                        ("Structural similarity (teacher + 2 students + sensitivity)", tw + 2 * sw + sens),
                        ("Delta ranges (4 checkpoints + sensitivity)", 2 * tw + 2 * sw + sens),
                        ("teacher weights", tw), ("student weights", sw)):
            rows.append({"pair": pair_name, "step": step, "GiB": b / GiB})
    return pd.DataFrame(rows).pivot(index="step", columns="pair", values="GiB")


def memory_reading(memory: pd.DataFrame, dtype: str, *, limit_gib: float = GPU_GIB) -> str:
    """Which steps do not fit one 80 GB GPU, and what to do about them (Markdown)."""
    over = [(step, pair, v) for step, r in memory.iterrows() for pair, v in r.items() if v > limit_gib]
    lines = [f"Estimated in {dtype}. Steps that do not fit one 80 GB GPU (about {limit_gib} GiB usable):"
             if over else f"Estimated in {dtype}: every step fits one 80 GB GPU."]
    lines += [f"* {step}, {pair}: {v:.0f} GiB" for step, pair, v in over]
    if over:
        lines.append("\nFor those, use a larger GPU (e.g. 141 GB), keep the base checkpoints on the CPU (delta ranges "
                     "only need their weights), or shorten the LaTen batch (activations grow with batch x sequence "
                     "length; the estimate uses 16 sequences of 512 tokens).")
    return "\n".join(lines)
