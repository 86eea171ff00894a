"""Language-based distillation baselines (paper Section 5.3, Tables 7-8) through TRL.

The paper sets LaTen beside three ways of teaching the student with the teacher's *outputs*
instead of its parameters, at a data budget matched to LaTen's (<= 100 examples) and at a
larger one. All three train the same LoRA on the student (r = 16, alpha = 16 on up/down/v/o,
:func:`pktlib.postalign.lora_model`; the authors' distillation script also trains LoRA r = 16,
alpha = 16) and differ only in the sequences trained on and the loss. The variant is one
argument, ``method``, looked up in :data:`METHODS`:

* ``"supervised-kd"``: token-level KL to the teacher's next-token distribution on the gold
  answers. TRL's ``GKDTrainer`` with ``lmbda=0`` (never student samples: always the dataset's
  sequences; TRL docs: "when lmbda=0.0, the loss reduces to supervised JSD") and ``beta=0``,
  where TRL's generalized JSD takes its ``beta == 0`` branch and computes exactly
  ``KL(teacher || student)`` per answer token (forward KL, temperature 1), averaged over the
  answer tokens of the batch. No cross-entropy term on the gold tokens.
* ``"gkd"``: on-policy GKD (Agarwal et al. 2024), TRL's ``GKDTrainer`` with the authors'
  settings (``rebuttal/Distillation/gkd_run.sh`` in Trae1ounG/Neural_Incompatibility:
  ``--lmbda 1 --beta 0``): every batch's answers are sampled from the student (temperature
  0.9, TRL's default) and the loss is the forward KL to the teacher on those samples. (The
  trainer divides the summed KL by the batch's *gold* answer tokens, counted before the samples
  replace them, so GKD's logged loss is not a per-sampled-token mean.)
* ``"seqkd"``: sequence-level KD (Kim and Rush 2016): the teacher answers every prompt greedily
  (Hugging Face ``generate``, or a vLLM engine serving the same checkpoint; cut at the chat stop
  strings, exactly as scored), and
  the student is fine-tuned on these answers with TRL's ``SFTTrainer`` (cross-entropy on the
  answer tokens). The authors' README instead describes TRL's ``seq_kd=True``, which samples
  the teacher anew at every step and keeps the KL loss; the fixed greedy targets here are Kim
  and Rush's definition.

Data budgets (:func:`budget_examples`): ``"laten"``, the examples LaTen's alignment training
is given on the task (its ``default_steps`` extract examples plus the align split it draws
its batches from: 82-88 on the pocket families, <= 100 on the paper's splits); an integer N,
the first N examples of the train split (the paper's larger setting is N = 1000).

Prompts, tokenisation and masking are the project's (:func:`pktlib.data.format_prompt`, in the
format ``template`` names: the original code's by default, a chat model's own template with
"auto"; :func:`pktlib.data.tokenize_example`: prompt labels -100, EOS after the answer); TRL never
applies a chat template of its own. Runs are resumable: the trainer's checkpoints are marked
complete only after they are written, the distilled student is saved through
:func:`pktlib.records.atomic_dir` and ``result.json`` last, and a finished run is returned from
its folder without training again.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import shutil
import time
import warnings
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, ContextManager, Sequence

import torch
from datasets import Dataset
from torch import nn
from transformers import PrinterCallback, TrainerCallback
from trl import SFTConfig, SFTTrainer

from pktlib.data import (Example, answer_token_budget, collate, format_prompt, load_examples, load_task,
                         prompt_answer_pairs, tokenize_example)
from pktlib.cache import cache_dir, locked
from pktlib.errors import PktError
from pktlib.evaluation import Generator, HFGenerator, stop_strings
from pktlib.data.examples import write_examples
from pktlib.hooks import with_grad
from pktlib.laten import default_steps
from pktlib.models import check_pair, load_model, resolve_model, weights_hash
from pktlib.postalign import finetune_defaults, lora_model
from pktlib.records import atomic_dir, atomic_write_text, cpu_seconds, read_json, write_json

__all__ = [
    "Method",
    "METHODS",
    "DistillConfig",
    "DistillResult",
    "budget_examples",
    "teacher_answers",
    "distill",
]


# ----------------------------------------------------------------------------------------
# The three methods: one table, dispatched in :func:`distill`


@dataclass(frozen=True)
class Method:
    """What a distillation method trains on and with which TRL trainer."""

    name: str
    targets: str  # "gold": the dataset's answers; "teacher": the teacher's greedy answers
    trainer: str  # "gkd": trl.experimental.gkd.GKDTrainer; "sft": trl.SFTTrainer
    lmbda: float | None  # GKD: share of batches answered by the student's own samples
    beta: float | None  # GKD: generalized-JSD interpolation (0: forward KL(teacher || student))
    reference: str


METHODS: dict[str, Method] = {
    m.name: m for m in (
        Method("supervised-kd", "gold", "gkd", 0.0, 0.0,
               "Hinton et al. 2015; Sanh et al. 2019 (token-level KD on gold sequences)"),
        Method("seqkd", "teacher", "sft", None, None, "Kim and Rush 2016, https://arxiv.org/abs/1606.07947"),
        Method("gkd", "gold", "gkd", 1.0, 0.0, "Agarwal et al. 2024, https://arxiv.org/abs/2306.13649"),
    )
}


@dataclass
class DistillConfig:
    """Settings of one distillation run (saved in the run folder; a resumed run must match)."""

    method: str = field(metadata={"help": "one of METHODS"})
    task: str = field(metadata={"help": "task name: its family picks the default lr"})
    budget: str = field(metadata={"help": "'laten', 'train:N' or 'custom:N' (examples passed in)"})
    n_examples: int = 0
    lr: float = 3e-4
    epochs: float = 1.0
    batch_size: int = field(default=16, metadata={"help": "examples per optimiser step"})
    micro_batch: int = field(default=16, metadata={"help": "examples per forward pass (gradient accumulation)"})
    lora: bool = field(default=True, metadata={"help": "train a LoRA (else every student parameter)"})
    r: int = 16
    alpha: int = 16
    lmbda: float | None = None
    beta: float | None = None
    temperature: float = field(default=0.9, metadata={"help": "GKD: sampling temperature of on-policy answers"})
    max_new_tokens: int = field(default=0, metadata={"help": "GKD/SeqKD: new tokens per generated answer"})
    max_length: int = 512
    template: str = field(default="default", metadata={"help": "prompt format (pktlib.data.format_prompt)"})
    # Share of steps with linear warm-up (rounded down: a run shorter than 1/warmup steps has none,
    # since the scheduler's first warm-up step has learning rate 0), then linear decay to 0.
    warmup: float = 0.03
    seed: int = 0
    teacher_sha256: str = ""
    student_sha256: str = ""

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise PktError(f"unknown distillation `method` {self.method!r}; expected one of {', '.join(METHODS)}")
        if self.batch_size <= 0 or self.micro_batch <= 0 or self.batch_size % self.micro_batch:
            raise PktError(f"`batch_size` ({self.batch_size}) must be a positive multiple of `micro_batch` "
                           f"({self.micro_batch})")
        if self.epochs <= 0 or self.lr <= 0:
            raise PktError(f"`epochs` and `lr` must be positive, got {self.epochs} and {self.lr}")
        for name in ("lmbda", "beta"):
            v = getattr(self, name)
            if v is not None and not 0.0 <= v <= 1.0:
                raise PktError(f"`{name}` must be in [0, 1], got {v}")


@dataclass
class DistillResult:
    """A finished distillation run. ``student_dir`` holds the distilled student (LoRA merged)."""

    out_dir: str
    student_dir: str
    config: DistillConfig
    steps: int
    final_loss: float | None
    wall_s: float
    trainable_parameters: int
    cpu_s: float = 0.0  # CPU seconds of this call (teacher answers, training, saving), as pktlib.records.cpu_seconds
    resumed_from: int = 0  # optimiser step the run resumed from (0: from scratch)
    from_record: bool = False  # True when returned from a finished run's folder without training
    log: list[dict[str, Any]] = field(default_factory=list)  # one row per optimiser step: step, loss, lr

    def curve(self) -> list[tuple[int, float]]:
        return [(r["step"], r["loss"]) for r in self.log]

    def load_student(self, dtype: str = "float32"):
        """``(model, tokenizer)`` of the distilled student."""
        return load_model(self.student_dir, dtype=dtype)


# ----------------------------------------------------------------------------------------
# Data


def budget_examples(task: str, budget: str | int) -> tuple[list[Example], str]:
    """``(examples, label)`` of a data budget on ``task`` (paper Tables 7-8).

    ``budget="laten"``: the examples LaTen's alignment training is given, its
    :func:`pktlib.laten.default_steps` extract examples (one per step) followed by the align
    split; an int ``N`` (or ``"N"``): the first ``N`` examples of the train split.
    Raises :class:`PktError` for an unknown budget or a split with fewer than ``N`` examples.
    """
    if budget == "laten":
        steps = default_steps(task)
        return load_task(task, "extract")[:steps] + load_task(task, "align"), "laten"
    try:
        n = int(budget)
    except (TypeError, ValueError):
        raise PktError(f"unknown data budget {budget!r}; expected 'laten' or a number of train examples") from None
    train = load_task(task, "train")
    if not 0 < n <= len(train):
        raise PktError(f"budget N={n} but task {task!r} has {len(train)} train examples")
    return train[:n], f"train:{n}"


def teacher_answers(teacher: nn.Module, tokenizer, examples: Sequence[Example], *, max_new_tokens: int,
                    batch_size: int = 32, template: str = "default", generator: Generator | None = None,
                    progress: bool = False) -> list[Example]:
    """The examples with their answers replaced by the teacher's greedy answers (SeqKD targets).

    Generation and the cut at the chat stop strings are :mod:`pktlib.evaluation`'s, so the
    targets are what the teacher would be scored on; the prompts are in ``template``'s format
    (:func:`pktlib.data.format_prompt`), as the training sequences. ``generator``: another
    backend serving the same teacher (a vLLM engine on its checkpoint; greedy either way),
    else Hugging Face ``generate`` on ``teacher``. ``meta["gold_answer"]`` keeps the answer.
    """
    gen = generator or HFGenerator(teacher, tokenizer, batch_size=batch_size)
    prompts = [format_prompt(ex.messages, tokenizer=tokenizer, template=template) for ex in examples]
    answers = gen.generate(prompts, max_new_tokens, stop_strings(tokenizer), progress=progress)
    return [Example(ex.prompt_messages + [{"role": "assistant", "content": a.strip()}],
                    {**ex.meta, "gold_answer": ex.answer, "teacher_backend": gen.name})
            for ex, a in zip(examples, answers)]


@dataclass
class _Collator:
    """Right-padded ``input_ids``/``attention_mask``/``labels`` (pktlib.data.collate); for GKD also
    the left-padded prompts (``prompts``, ``prompt_attention_mask``) its on-policy generation reads."""

    pad_id: int
    with_prompts: bool

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        b = collate([{"input_ids": r["input_ids"], "labels": r["labels"]} for r in rows], self.pad_id)
        out = {"input_ids": b.input_ids, "attention_mask": b.attention_mask, "labels": b.labels}
        if self.with_prompts:
            p = collate([{"input_ids": r["input_ids"][:r["prompt_len"]], "labels": [-100] * r["prompt_len"]}
                         for r in rows], self.pad_id, padding_side="left")
            out["prompts"], out["prompt_attention_mask"] = p.input_ids, p.attention_mask
        return out


def _dataset(tokenizer, examples: Sequence[Example], max_length: int, template: str):
    rows = []
    for pair in prompt_answer_pairs(examples, tokenizer=tokenizer, template=template):
        it = tokenize_example(tokenizer, pair, max_length=max_length)
        prompt_len = sum(1 for l in it["labels"] if l == -100)  # prompt labels are masked, answer ones not
        if prompt_len < len(it["labels"]):
            rows.append({"input_ids": it["input_ids"], "labels": it["labels"], "prompt_len": prompt_len})
    if not rows:
        raise PktError("no example has an answer token left to train on (check max_length)")
    return Dataset.from_list(rows)


# ----------------------------------------------------------------------------------------
# Resumable trainer checkpoints

_COMPLETE = "pkt_complete.json"


def _answer_source(generator: Any) -> str:
    """What produced SeqKD's teacher answers: "hf" (``generate`` on the teacher), a generator's
    ``label`` (e.g. "vllm-bfloat16": greedy answers differ between dtypes), else "custom"."""
    if generator is None:
        return "hf"
    return str(getattr(generator, "label", None) or "custom")


def _shared_teacher_answers(teacher: nn.Module, tokenizer, examples: Sequence[Example], cfg: DistillConfig, *,
                            generator: Callable[[], ContextManager[Generator]] | None,
                            root: str | os.PathLike | None, progress: bool) -> list[Example]:
    """:func:`teacher_answers` through a cache shared by runs: seeds (and any other setting the
    answers do not depend on) reuse one generation. Keyed by the teacher's weights, the prompts
    as formatted, the stop strings, ``max_new_tokens`` and the generator's label
    (:func:`_answer_source`); ``root`` default
    ``cache_dir()/"teacher-answers"``. A lock makes concurrent runs wait for one generation."""
    prompts = [format_prompt(ex.messages, tokenizer=tokenizer, template=cfg.template) for ex in examples]
    ident = {"teacher": cfg.teacher_sha256, "prompts": prompts, "stops": stop_strings(tokenizer),
             "max_new_tokens": cfg.max_new_tokens}
    source = _answer_source(generator)
    if source != "hf":  # named only for other backends, so Hugging Face generate's answers keep their files
        ident["source"] = source
    key = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]
    path = Path(root or cache_dir() / "teacher-answers") / f"{key}.jsonl"
    with locked(path.with_suffix(".lock")):
        if path.is_file():
            return load_examples(path)
        with generator() if generator else nullcontext() as gen:
            answers = teacher_answers(teacher, tokenizer, examples, max_new_tokens=cfg.max_new_tokens,
                                      template=cfg.template, progress=progress, generator=gen)
        if getattr(generator, "label", None):  # the settings' name, not only the backend's
            answers = [Example(a.messages, {**a.meta, "teacher_backend": source}) for a in answers]
        write_examples(path, answers)
    return answers


def _complete_checkpoints(folder: Path) -> list[Path]:
    """Trainer checkpoints whose writing finished (marked by :class:`_MarkComplete`), oldest first.

    An unmarked ``checkpoint-N`` (interrupted while saving) is deleted here.
    """
    out = []
    for p in sorted(folder.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1])):
        if (p / _COMPLETE).is_file():
            out.append(p)
        else:
            shutil.rmtree(p, ignore_errors=True)
    return out


def _mark_complete_callback():
    class _MarkComplete(TrainerCallback):
        """After the trainer has written ``checkpoint-<step>``, mark it complete (atomically)."""

        def on_save(self, args, state, control, **kwargs):
            ck = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if ck.is_dir():
                atomic_write_text(ck / _COMPLETE, json.dumps({"step": state.global_step}) + "\n")
            return control

    return _MarkComplete()


# ----------------------------------------------------------------------------------------
# The entry point


def _as_pair(x: Any, role: str) -> tuple[nn.Module, Any]:
    model, tok, _ = resolve_model(x)
    if tok is None:
        raise PktError(f"{role}: pass a (model, tokenizer) pair or a model directory: distillation tokenises with it")
    return model, tok


def _check_shared_vocabulary(teacher: nn.Module, student: nn.Module, t_tok, s_tok) -> None:
    check_pair(teacher, student, method="token-level distillation", larger=(), same=("vocab_size",),
               tokenizers=(t_tok, s_tok))


def _trainer_args(cfg: DistillConfig, out: Path, n_rows: int, progress: bool, save_every: int | None) -> dict[str, Any]:
    accum = cfg.batch_size // cfg.micro_batch
    steps = math.ceil(math.ceil(n_rows / cfg.micro_batch) / accum * cfg.epochs)
    return dict(
        output_dir=str(out / "trainer"), per_device_train_batch_size=cfg.micro_batch,
        gradient_accumulation_steps=accum, learning_rate=cfg.lr, num_train_epochs=cfg.epochs,
        lr_scheduler_type="linear", warmup_steps=int(cfg.warmup * steps), weight_decay=0.0,
        logging_steps=1, save_strategy="steps", save_steps=save_every or max(1, steps // 4), save_total_limit=2,
        report_to=[], disable_tqdm=not progress, seed=cfg.seed, data_seed=cfg.seed, dataloader_num_workers=0,
        remove_unused_columns=False, dataset_kwargs={"skip_prepare_dataset": True}, max_length=None,
        use_cpu=not torch.cuda.is_available(), bf16=False, fp16=False,
    )


@with_grad
def distill(student: Any, teacher: Any, task: str, *, method: str = "supervised-kd", budget: str | int = "laten",
            examples: Sequence[Example] | None = None, out_dir: str | os.PathLike, lr: float | None = None,
            epochs: float = 1.0, batch_size: int = 16, micro_batch: int = 16, lora: bool = True, r: int = 16,
            alpha: int = 16, lmbda: float | None = None, beta: float | None = None, temperature: float = 0.9,
            max_new_tokens: int | None = None, max_length: int = 512, template: str = "default", seed: int = 0,
            teacher_generator: Callable[[], ContextManager[Generator]] | None = None,
            answers_dir: str | os.PathLike | None = None, save_every: int | None = None,
            progress: bool = True) -> DistillResult:
    """Distil ``teacher`` into ``student`` on ``task`` with ``method`` (see the module docstring).

    ``student``/``teacher``: model directories or ``(model, tokenizer)`` pairs sharing one
    tokenizer; neither is modified (the student is copied before LoRA is added). ``budget``:
    ``"laten"`` or N train examples (:func:`budget_examples`); ``examples`` overrides it.
    ``lr`` defaults to paper Table 4 for the task's family (:func:`pktlib.postalign.finetune_defaults`;
    the same rate as the book's Post-Align runs); ``batch_size`` examples per optimiser step in
    micro-batches of ``micro_batch``; AdamW, linear warm-up over 3% of the steps, then linear
    decay. ``lmbda``/``beta`` override the method's GKD values. ``max_new_tokens`` (GKD's
    on-policy answers, SeqKD's teacher answers) defaults to 1.5x the longest reference answer.
    ``template``: the prompt format of the training sequences and of SeqKD's teacher prompts
    (:func:`pktlib.data.format_prompt`; "auto" for a chat model's own template, as the real
    pair's evaluator prompts). ``teacher_generator``: opens the backend SeqKD's teacher answers
    come from, as a context manager that frees it on exit (entered only when the answers are not
    in ``out_dir`` yet; e.g. :meth:`pktlib.experiments.real_pair.SavedScorer.opener`, a vLLM engine on the
    teacher's checkpoint, many times faster than ``generate`` on a CPU; default: Hugging Face
    ``generate`` on ``teacher``). Greedy either way; each saved answer's ``meta["teacher_backend"]``
    says which produced it (a generator's ``label``, e.g. "vllm-bfloat16", when it has one:
    :meth:`pktlib.experiments.real_pair.SavedScorer.opener`). It is not a setting a resumed run
    must match: saved answers are reused.
    SeqKD's teacher answers are also kept in ``answers_dir`` (default ``$PKT_CACHE/teacher-answers``)
    under a hash of the teacher's weights, the prompts, the stop strings, ``max_new_tokens`` and that
    label (greedy answers differ between float32 and bfloat16), so
    that runs differing only in what the answers do not depend on (seed, learning rate, epochs)
    generate them once.

    Writes into ``out_dir``: ``distill_config.json``, ``teacher_answers.jsonl`` (SeqKD),
    ``trainer/`` (TRL/Trainer checkpoints while running), ``student/`` (the distilled student,
    LoRA merged) and ``result.json``. Raises :class:`PktError` when ``out_dir`` holds a run
    with other settings.
    """
    t0, c0 = time.perf_counter(), cpu_seconds()
    if method not in METHODS:
        raise PktError(f"unknown distillation method {method!r}; expected one of {', '.join(METHODS)}")
    m = METHODS[method]
    s_model, s_tok = _as_pair(student, "student")
    t_model, t_tok = _as_pair(teacher, "teacher")
    _check_shared_vocabulary(t_model, s_model, t_tok, s_tok)
    tok = s_tok
    if examples is not None:
        examples, label = list(examples), f"custom:{len(examples)}"
    else:
        examples, label = budget_examples(task, budget)
    if not examples:
        raise PktError("no examples to distil on")
    eff_lmbda = m.lmbda if lmbda is None else lmbda
    generates = m.targets == "teacher" or (m.trainer == "gkd" and eff_lmbda > 0)
    cfg = DistillConfig(
        method=method, task=task, budget=label, n_examples=len(examples),
        lr=float(lr if lr is not None else finetune_defaults(task)[0]), epochs=float(epochs), batch_size=batch_size,
        micro_batch=micro_batch, lora=lora, r=r, alpha=alpha, lmbda=eff_lmbda, beta=m.beta if beta is None else beta,
        temperature=temperature,
        max_new_tokens=int(max_new_tokens or (answer_token_budget(tok, [ex.answer for ex in examples], 1.5) if generates else 0)),
        max_length=max_length, template=template, seed=seed, teacher_sha256=weights_hash(t_model),
        student_sha256=weights_hash(s_model),
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg_path, result_path = out / "distill_config.json", out / "result.json"
    if cfg_path.is_file():
        # settings added since a run was saved count at their defaults, so older runs still resume
        old = {**json.loads(json.dumps(asdict(DistillConfig(method, task, label)))), **read_json(cfg_path)}
        new = json.loads(json.dumps(asdict(cfg)))
        diff = {k: (old.get(k), v) for k, v in new.items() if old.get(k) != v}
        if diff:
            raise PktError(f"{out} holds a distillation run with other settings (saved, now): {diff}; "
                           "use another out_dir")
        if result_path.is_file() and (out / "student" / "config.json").is_file():
            rec = read_json(result_path)
            rec["config"] = DistillConfig(**rec["config"])
            return DistillResult(**{**rec, "from_record": True})
    write_json(cfg_path, cfg)

    # ---- training sequences
    if m.targets == "teacher":
        cached = out / "teacher_answers.jsonl"
        if cached.is_file():
            examples = load_examples(cached)
        else:
            examples = _shared_teacher_answers(t_model, t_tok or tok, examples, cfg, generator=teacher_generator,
                                               root=answers_dir, progress=progress)
            write_examples(cached, examples)
    data = _dataset(tok, examples, cfg.max_length, template)

    # ---- the student to train: a copy, with a LoRA (or all parameters trainable)
    work = copy.deepcopy(s_model)
    if lora:
        # No LoRA dropout: TRL's GKD disables dropout in the student by default; the same for all methods.
        work = lora_model((work, tok), init="random", r=r, alpha=alpha, dropout=0.0, seed=seed, progress=False)
    else:
        work.requires_grad_(True)
    work.train()
    n_trainable = sum(p.numel() for p in work.parameters() if p.requires_grad)
    t_was = t_model.training
    t_grad = [p.requires_grad for p in t_model.parameters()]
    t_model.eval().requires_grad_(False)

    args = _trainer_args(cfg, out, len(data), progress, save_every)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    if m.trainer == "gkd":
        with warnings.catch_warnings():  # the pin in pyproject.toml fixes the experimental API we use
            warnings.filterwarnings("ignore", message=".*trl.experimental.*")
            from trl.experimental.gkd import GKDConfig, GKDTrainer  # experimental: imported where used, warning silenced

        targs = GKDConfig(**args, lmbda=cfg.lmbda, beta=cfg.beta, temperature=cfg.temperature,
                          max_new_tokens=max(1, cfg.max_new_tokens), disable_dropout=True)
        trainer = GKDTrainer(model=work, teacher_model=t_model, args=targs, train_dataset=data,
                             processing_class=tok, data_collator=_Collator(pad, with_prompts=True),
                             callbacks=[_mark_complete_callback()])
    else:
        trainer = SFTTrainer(model=work, args=SFTConfig(**args), train_dataset=data, processing_class=tok,
                             data_collator=_Collator(pad, with_prompts=False), callbacks=[_mark_complete_callback()])
    if not progress:
        trainer.remove_callback(PrinterCallback)
    done = _complete_checkpoints(out / "trainer")
    resume = str(done[-1]) if done else None
    resumed_from = int(done[-1].name.split("-")[-1]) if done else 0
    try:
        trainer.train(resume_from_checkpoint=resume)
    finally:
        t_model.train(t_was)
        for p, g in zip(t_model.parameters(), t_grad):
            p.requires_grad_(g)
    log = [{"step": int(h["step"]), "loss": float(h["loss"]), "lr": float(h.get("learning_rate", 0.0))}
           for h in trainer.state.log_history if "loss" in h]

    # ---- the distilled student, LoRA merged, in Hugging Face format
    trained = trainer.model
    if lora:
        trained = trained.merge_and_unload()
    trained.eval()
    with atomic_dir(out / "student") as tmp:
        trained.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
    res = DistillResult(str(out), str(out / "student"), cfg, int(trainer.state.global_step),
                        log[-1]["loss"] if log else None, round(time.perf_counter() - t0, 2), n_trainable,
                        round(cpu_seconds() - c0, 2), resumed_from, False, log)
    write_json(result_path, res)
    shutil.rmtree(out / "trainer", ignore_errors=True)  # optimiser states are not needed once finished
    return res
