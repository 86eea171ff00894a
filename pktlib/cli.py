"""The ``pkt`` command.

Every command is a thin wrapper over a pktlib function. User errors (:class:`PktError`) print
one line to stderr and exit with status 1, without a traceback.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional, Tuple

import typer

from pktlib.errors import PktError

app = typer.Typer(help="Cross-scale parametric knowledge transfer (pktlib).", no_args_is_help=True,
                  pretty_exceptions_enable=False, add_completion=False)
zoo_app = typer.Typer(help="The pocket pair: a small teacher/student model organism.", no_args_is_help=True)
laten_app = typer.Typer(help="LaTen: Locate-Then-Align pre-align transfer.", no_args_is_help=True)
baseline_app = typer.Typer(help="Unaligned Pre-Align baselines.", no_args_is_help=True)
app.add_typer(zoo_app, name="zoo")
app.add_typer(laten_app, name="laten")
app.add_typer(baseline_app, name="baseline")


def _parse_value(text: str):
    """A -p value: JSON when it parses (numbers, lists, true/false), else the plain string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


# ---------------------------------------------------------------------------- foundation
@app.command()
def info(source: str = typer.Argument(..., help="Hub id, local model directory or .gguf file.")) -> None:
    """Print the ModelSpec (architecture and dimensions) of a model."""
    from pktlib.models import load_model, spec

    model, _ = load_model(source)
    s = spec(model)
    n_params = sum(p.numel() for p in model.parameters())
    for k, v in {**s.to_dict(), "parameters": n_params}.items():
        typer.echo(f"{k:>20}: {v}")


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def run(
    ctx: typer.Context,
    notebook: Path = typer.Argument(..., help="Notebook to execute (from notebooks/)."),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="Executed copy (default: book/<name>)."),
) -> None:
    """Execute a notebook with papermill and write its JSON results record beside it.

    Parameters as in papermill: `-p NAME VALUE` (repeatable); VALUE is parsed as JSON when it
    can be (numbers, lists, true/false), else kept as a string.
    """
    from pktlib.records import record_path, run_notebook

    params = _parse_params(ctx.args)
    rec = run_notebook(notebook, output, params)
    typer.echo(f"wrote {rec.output} and {record_path(rec.output)} ({rec.wall_time_s:.0f} s)")


def _parse_params(args: List[str]) -> dict:
    """`-p NAME VALUE` triples (typer has no two-value repeatable option)."""
    params, i = {}, 0
    while i < len(args):
        if args[i] not in ("-p", "--param"):
            raise PktError(f"unexpected argument {args[i]!r}; parameters are given as -p NAME VALUE")
        if i + 2 >= len(args):
            raise PktError(f"{args[i]} needs NAME VALUE; got {args[i + 1:]}")
        params[args[i + 1]] = _parse_value(args[i + 2])
        i += 3
    return params


@app.command()
def book(
    execute: bool = typer.Option(False, help="Execute every notebook of the book first (papermill)."),
    force: bool = typer.Option(False, help="Re-execute notebooks whose records are up to date."),
    only: Optional[List[str]] = typer.Option(None, help="Execute only these notebooks (by name)."),
    html: bool = typer.Option(True, help="Build the HTML book into _build/html."),
) -> None:
    """Build the HTML book into _build/html (optionally executing the notebooks first)."""
    from pktlib.book import build_book, execute_all

    if execute:
        execute_all(force=force, only=only)
    if html:
        build_book()


# ---------------------------------------------------------------------------- attribution
@app.command()
def attribute(
    model: str = typer.Argument(..., help="Hub id, local model directory or .gguf file."),
    task: str = typer.Option(..., "--task", help="Task name (e.g. pocket-math, gsm8k) or a .jsonl file."),
    split: str = typer.Option("extract", help="Split of the task."),
    limit: Optional[int] = typer.Option(None, help="Use only the first N examples."),
    out: Path = typer.Option(Path("scores.safetensors"), "--out", help="Output file (safetensors)."),
    normaliser: str = typer.Option("rms", help="'rms' (the definition) or 'original' (the original code's)."),
    per_example: bool = typer.Option(False, "--per-example", help="Also store per-example scores."),
    batch_size: int = typer.Option(8, help="Examples per forward pass."),
    chunk_size: int = typer.Option(4096, help="Neurons per unembedding block (bounds memory)."),
) -> None:
    """Neuron-level attribution scores (FFN and attention) of MODEL on a task, as safetensors."""
    from pktlib.attribution import NORMALISERS, attribute as run_attribution, save_attribution
    from pktlib.data import load_task, prompt_answer_pairs
    from pktlib.models import load_model

    if normaliser not in NORMALISERS:  # before loading anything
        raise PktError(f"unknown normaliser {normaliser!r}; expected one of {sorted(NORMALISERS)}")
    if limit is not None and limit < 1:
        raise PktError(f"--limit must be >= 1, got {limit}")
    examples = load_task(task, split, limit=limit)
    lm, tok = load_model(model)
    attr = run_attribution(lm, tok, prompt_answer_pairs(examples), normaliser=normaliser,
                           per_example=per_example, batch_size=batch_size, chunk_size=chunk_size, progress=True)
    save_attribution(attr, out, {"model": model, "task": task, "split": split, "n_examples": len(examples)})
    typer.echo(f"wrote {out}: {len(examples)} examples, {attr.n_layers} layers, "
               f"best FFN layer {int(attr.ffn_layers.argmax())}, best attention layer {int(attr.attn_layers.argmax())}")


# ---------------------------------------------------------------------------- laten
@laten_app.command("train")
def laten_train(
    teacher: str = typer.Option(..., "--teacher", help="Teacher model (dir, hub id or .gguf)."),
    student: str = typer.Option(..., "--student", help="Student model (dir, hub id or .gguf)."),
    task: str = typer.Option(..., "--task", help="Task whose extract/align splits are used (e.g. pocket-math)."),
    out: Path = typer.Option(..., "--out", help="Run folder: checkpoint_<step>/, log.jsonl (resumes if present)."),
    steps: Optional[int] = typer.Option(None, help="Alignment steps (default: paper Table 5 for the task)."),
    transfer_rate: float = typer.Option(0.1, help="Share of the student's neurons per layer."),
    align_batch: int = typer.Option(16, help="P: the extract example plus P-1 random align examples."),
    lr: float = typer.Option(3e-5, help="Peak learning rate (AdamW, one-cycle)."),
    seed: int = typer.Option(42, help="Translator init and align sampling."),
    train_on_inputs: bool = typer.Option(False, "--train-on-inputs", help="Also take the loss on the prompt."),
    max_length: int = typer.Option(512, help="Tokens per example."),
    micro_batch: Optional[int] = typer.Option(None, help="Examples per forward pass (gradient accumulation)."),
    gqa_rule: str = typer.Option("sum", help="Shared v_proj rows under GQA: 'sum' or 'mean'."),
    device: Optional[str] = typer.Option(None, help="Device for both models (default cpu)."),
) -> None:
    """Train a LaTen translator (one step per extract example; saved after every step)."""
    from pktlib.laten import train

    res = train(teacher, student, task, transfer_rate=transfer_rate, steps=steps, align_batch=align_batch, lr=lr,
                seed=seed, out_dir=out, train_on_inputs=train_on_inputs, max_length=max_length,
                micro_batch=micro_batch, gqa_rule=gqa_rule, device=device, progress=True)
    last = res.log[-1]
    typer.echo(f"wrote {res.final} ({len(res.checkpoints)} checkpoints, resumed after step {res.resumed_from}); "
               f"last step: LM loss {last['lm_loss']:.4f} -> {last['lm_loss_after']:.4f}, "
               f"student alone {last['student_lm_loss']:.4f}, mse {last['mse']:.3e}")


@laten_app.command("apply")
def laten_apply(
    teacher: str = typer.Option(..., "--teacher", help="Teacher model (dir, hub id or .gguf)."),
    student: str = typer.Option(..., "--student", help="Student model (dir, hub id or .gguf)."),
    translator: Path = typer.Option(..., "--translator", help="Checkpoint folder, or a run folder (see --step)."),
    task: str = typer.Option(..., "--task", help="Task of the unseen example."),
    out: Path = typer.Option(..., "--out", help="Folder for the injected student (HF format) and changes.json."),
    step: Optional[int] = typer.Option(None, help="Checkpoint step when --translator is a run folder (default: last)."),
    split: str = typer.Option("train", help="Split the unseen example comes from."),
    example_index: int = typer.Option(0, help="Index of the example in that split."),
    transfer_rate: float = typer.Option(0.1, help="Share of the student's neurons per layer."),
    gqa_rule: str = typer.Option("sum", help="Shared v_proj rows under GQA: 'sum' or 'mean'."),
    device: Optional[str] = typer.Option(None, help="Device for both models (default cpu)."),
) -> None:
    """Inject translated teacher neurons into the student for good, located on one unseen example."""
    from pktlib.laten import apply

    res = apply(teacher, student, translator, task=task, split=split, example_index=example_index,
                transfer_rate=transfer_rate, out_dir=out, step=step, gqa_rule=gqa_rule, device=device, progress=True)
    n = sum(len(e["indices"]) for e in res.record.entries)
    typer.echo(f"wrote {out}: {len(res.record.entries)} (layer, module) deltas over {n} rows/columns "
               f"from {res.record.meta['translator']}; record in {out / 'changes.json'}")


def main() -> None:
    try:
        app(standalone_mode=False)
    except PktError as e:
        typer.echo(f"error: {e}", err=True)
        raise SystemExit(1)
    except (FileNotFoundError, IsADirectoryError, PermissionError) as e:
        typer.echo(f"error: {e}", err=True)
        raise SystemExit(1)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        raise SystemExit(130)
    except SystemExit:
        raise
    except Exception as e:
        # Usage errors of typer's (vendored) click arrive here in non-standalone mode.
        if hasattr(e, "show") and hasattr(e, "exit_code"):
            e.show()
            raise SystemExit(e.exit_code)
        if type(e).__name__ == "Abort":
            raise SystemExit(1)
        raise


if __name__ == "__main__":
    main()
