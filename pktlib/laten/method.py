"""LaTen's method: configuration, locate, the loss, training the translator, applying it (DESIGN.md 4.3).

Tan et al. 2025, "Neural Incompatibility", Section 4 (original code: train_LaTen.py,
inference_LaTen.py in Trae1ounG/Neural_Incompatibility).

Training (:func:`train`), one optimiser step per *extract* example ``e``:

1. locate: attribute ``e`` in the teacher and in the student (:mod:`pktlib.attribution`);
   select the top ``L_sel`` layers of each (ascending) and the top ``k`` neurons per layer,
   with ``(L_sel, k_ffn, k_attn) = layer_budget(teacher, student, transfer_rate)``;
2. extract the teacher's up/down/v/o weights of those neurons (:mod:`pktlib.extraction`);
3. translate them to the student's hidden size (:mod:`pktlib.hypernet`);
4. add them functionally to the student's ranked neurons, layer j to layer j and neuron i to
   neuron i (:mod:`pktlib.injection`), and take the loss on ``e`` plus ``P - 1`` random
   *align* examples: mean LM loss + 1000 x sum over modules of mean(translated^2);
5. AdamW step on the translator only, save it to ``out_dir/checkpoint_<step>/`` (the loop,
   schedule, run folder and resume of :mod:`pktlib.training`).

Inference (:func:`pktlib.laten.transfer.apply`): attribute one unseen example in both models,
translate it with a saved checkpoint, add the result permanently, save the student and a record
of the change.

Deviations from the original code, all deliberate and small:

* The one-cycle schedule (the curve of ``OneCycleLR``: 10% warm-up, cosine, ``div_factor=25``,
  ``final_div_factor=1`` as in the original; :func:`pktlib.training.one_cycle`) spans ``schedule_steps``, by
  default the size of the extract set as in the original (which trains on every extract example
  and then picks the checkpoint of paper Table 5); training stops after ``steps``. AdamW's betas
  stay at (0.9, 0.95) as specified (``OneCycleLR``'s default, used by the original, also cycles
  beta1 between 0.85 and 0.95).
* The P - 1 align examples of step s are drawn with a ``random.Random`` seeded by
  ``(seed, s)`` (the original seeds with ``s`` alone), so different seeds see different batches
  and a resumed run draws exactly what an uninterrupted one would.
* Shared value rows under grouped-query attention: see :mod:`pktlib.injection` (``gqa_rule``).
* Everything is computed in the models' dtype (a model given as a path is loaded in float32, the
  rule of :func:`pktlib.models.resolve_model`); the translator in float32 (as the original).

``train_on_inputs`` defaults per task family: on for knowledge (MMLU-like) tasks, as the
original code's README requires for MMLU ("the original answer part is only 1 character which
is hard to calculate stable gradient"), off otherwise.

A run's locate-and-inject settings (transfer rate, attribution normaliser and attention
coefficient, GQA rule, and the layer/neuron budget they give) are stored with every translator
checkpoint (``laten_settings.json``); :func:`apply` uses them, and an explicit argument that
disagrees with them is an error rather than a silent mismatch.
"""
from __future__ import annotations

import os
import random
import time
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from pktlib.attribution import ATTN_COEFFICIENTS, NORMALISERS
from pktlib.data import Example, collate, load_task, prompt_answer_pairs, task_info, tokenize_example
from pktlib.errors import PktError
from pktlib.extraction import NeuronSlice, slice_neurons
from pktlib.hypernet import (WEIGHTS_NAME, Translator, TranslatorConfig, load_translator, save_translator,
                             translation_penalty)
from pktlib.injection import GQA_RULES, forward_injected, pair_deltas
from pktlib.laten.attributions import cached_attribution
from pktlib.models import TRANSFERRED_MODULES, ModelSpec, resolve_model, weights_hash
from pktlib.models import check_pair as check_models
from pktlib.records import read_json, write_json
from pktlib.selection import layer_budget, select
from pktlib.training import Checkpointed, RunDir, Schedule, read_log, saved_steps, train_steps

__all__ = [
    "TABLE5_STEPS", "FAMILY_STEPS", "default_steps", "LatenConfig", "check_pair", "Located", "locate",
    "laten_loss", "TrainResult", "train", "find_checkpoint", "read_log", "read_settings",
    "default_train_on_inputs", "check_locate_settings", "check_template", "SETTINGS_NAME", "APPLY_SETTINGS", "TEMPLATES",
]

# Paper Table 5: alignment steps (extract examples) per task.
TABLE5_STEPS: dict[str, int] = {"mmlu": 2, "gsm8k": 4, "humaneval": 3, "mbpp": 8}
# The pocket suite's families take the step count of their paper counterpart (code: HumanEval's).
FAMILY_STEPS: dict[str, int] = {"knowledge": 2, "math": 4, "code": 3}

CONFIG_NAME = "laten_config.json"  # the run folder's settings file (pktlib.training.RunDir)
SETTINGS_NAME = "laten_settings.json"  # beside each checkpoint's translator: what apply() must reuse
# The settings apply() takes from a checkpoint (the others, like lr, only matter for training).
APPLY_SETTINGS = ("transfer_rate", "normaliser", "attn_coefficient", "gqa_rule", "template")
# Prompt formats (pktlib.data.format_prompt): the original code's, or a chat model's own template.
TEMPLATES = ("default", "chat", "auto")


def default_steps(task: str) -> int:
    """Alignment steps for ``task`` (paper Table 5; pocket families: see :data:`FAMILY_STEPS`)."""
    info = task_info(task)
    if info.name in TABLE5_STEPS:
        return TABLE5_STEPS[info.name]
    if info.family in FAMILY_STEPS:
        return FAMILY_STEPS[info.family]
    raise PktError(f"no default step count for task {task!r} (family {info.family!r}); pass steps=")


def default_train_on_inputs(task: str) -> bool:
    """Whether the LM loss also covers the prompt by default: True for knowledge tasks (the
    original code's README: a one-letter MMLU answer gives no stable gradient), else False."""
    return task_info(task).family == "knowledge"


# ======================================================================== configuration


@dataclass
class LatenConfig:
    """Settings of one alignment run (saved as ``laten_config.json`` in the run folder)."""

    task: str = field(metadata={"help": "task name (pktlib.data); its extract and align splits are used"})
    steps: int = field(metadata={"help": "optimiser steps = extract examples used (paper Table 5)"})
    schedule_steps: int = field(metadata={"help": "length of the one-cycle schedule (default: extract-set size)"})
    transfer_rate: float = field(default=0.1, metadata={"help": "share of the student's neurons per layer"})
    align_batch: int = field(default=16, metadata={"help": "P: the extract example plus P-1 random align examples"})
    micro_batch: int | None = field(default=None, metadata={"help": "examples per forward (gradient accumulation)"})
    lr: float = 3e-5
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_pct: float = 0.1
    mse_weight: float = field(default=1000.0, metadata={"help": "weight of sum_m mean(translated^2)"})
    seed: int = 42
    train_on_inputs: bool = False
    max_length: int = field(default=512, metadata={"help": "tokens per example (longer ones are truncated)"})
    gqa_rule: str = field(default="sum", metadata={"help": "shared v_proj rows under GQA: 'sum' or 'mean'"})
    normaliser: str = field(default="rms", metadata={"help": "attribution normaliser (pktlib.attribution)"})
    attn_coefficient: str = field(default="summed",
                                  metadata={"help": "attention-neuron coefficient (pktlib.attribution)"})
    modules: tuple[str, ...] = TRANSFERRED_MODULES
    template: str = field(default="default", metadata={
        "help": "prompt format of attribution and the LM loss (pktlib.data.format_prompt): 'default' (the "
                "original code's), 'chat' or 'auto' (the tokenizer's chat template, as a chat model is evaluated)"})

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)
        self.modules = tuple(self.modules)
        if self.steps < 1:
            raise PktError(f"`steps` must be >= 1, got {self.steps}")
        if self.schedule_steps < self.steps:
            raise PktError(f"`schedule_steps` ({self.schedule_steps}) must be >= `steps` ({self.steps})")
        if not 0 < self.transfer_rate <= 1:
            raise PktError(f"`transfer_rate` must be in (0, 1], got {self.transfer_rate}")
        if self.align_batch < 1:
            raise PktError(f"`align_batch` must be >= 1, got {self.align_batch}")
        if not self.mse_weight >= 0:  # also rejects NaN
            raise PktError(f"`mse_weight` must be >= 0, got {self.mse_weight}")
        if self.micro_batch is not None and self.micro_batch < 1:
            raise PktError(f"`micro_batch` must be >= 1, got {self.micro_batch}")
        if self.gqa_rule not in GQA_RULES:
            raise PktError(f"`gqa_rule` must be one of {GQA_RULES}, got {self.gqa_rule!r}")
        check_locate_settings(self.normaliser, self.attn_coefficient)
        check_template(self.template)


def check_template(template: str) -> None:
    if template not in TEMPLATES:
        raise PktError(f"`template` must be one of {TEMPLATES}, got {template!r}")


def check_locate_settings(normaliser: str, attn_coefficient: str) -> None:
    if normaliser not in NORMALISERS:
        raise PktError(f"`normaliser` must be one of {sorted(NORMALISERS)}, got {normaliser!r}")
    if attn_coefficient not in ATTN_COEFFICIENTS:
        raise PktError(f"`attn_coefficient` must be one of {list(ATTN_COEFFICIENTS)}, got {attn_coefficient!r}")


# ======================================================================== models


def check_pair(teacher: nn.Module | ModelSpec, student: nn.Module | ModelSpec, *,
               modules: Sequence[str] = TRANSFERRED_MODULES) -> tuple[ModelSpec, ModelSpec]:
    """Specs of a teacher/student pair LaTen can work with; a clear :class:`PktError` otherwise.

    The teacher must be at least as wide as the student (hidden size, FFN size and attention
    size) and both must have every transferred module. Their head sizes may differ: attention
    neurons are paired by rank (DESIGN.md 4.3), and each model's value rows under grouped-query
    attention follow from its own heads (:meth:`pktlib.models.ModelSpec.v_row`). (The paper's pairs
    happen to share ``head_dim`` 128; Qwen2.5-Coder 1.5B -> 0.5B has 128 -> 64. This project
    required equal head sizes until that pair; nothing in the method or the original code does.)
    """
    return check_models(teacher, student, method="LaTen", modules=modules)


# ======================================================================== locate


@dataclass
class Located:
    """The teacher's extracted neurons and the student's receiving neurons for one example."""

    teacher_slice: NeuronSlice
    student_selection: Any  # pktlib.attribution.Selection
    teacher_selection: Any
    seconds: float


def locate(teacher: nn.Module, teacher_tok, student: nn.Module, student_tok, example: Example, *,
           transfer_rate: float, normaliser: str = "rms", attn_coefficient: str = "summed",
           cache_dir: str | os.PathLike | None = None, ids: tuple[str, str] | None = None,
           modules: Sequence[str] = TRANSFERRED_MODULES, template: str = "default") -> Located:
    """Attribute ``example`` in both models, select neurons, slice the teacher's (DESIGN.md 4.3).

    ``template``: the prompt format of the attributed text (:func:`pktlib.data.format_prompt`,
    with the teacher's tokenizer; a pair shares one tokenizer)."""
    t0 = time.perf_counter()
    ts, ss = check_pair(teacher, student, modules=modules)
    n_layers, k_ffn, k_attn = layer_budget(ts, ss, transfer_rate)
    t_id, s_id = ids or (weights_hash(teacher), weights_hash(student))
    pair_t = prompt_answer_pairs([example], tokenizer=teacher_tok, template=template)[0]
    how = {"cache_dir": cache_dir, "normaliser": normaliser, "attn_coefficient": attn_coefficient}
    t_attr = cached_attribution(teacher, teacher_tok, pair_t, model_id=t_id, **how)
    s_attr = cached_attribution(student, student_tok, pair_t, model_id=s_id, **how)
    t_sel = select(t_attr, n_layers=n_layers, k_ffn=k_ffn, k_attn=k_attn)
    s_sel = select(s_attr, n_layers=n_layers, k_ffn=k_ffn, k_attn=k_attn)
    sl = slice_neurons(teacher, t_sel, modules=tuple(modules), dtype=torch.float32)
    return Located(sl, s_sel, t_sel, time.perf_counter() - t0)


# ======================================================================== the loss


def laten_loss(translator: Translator, teacher_slice: NeuronSlice, student: nn.Module, student_selection: Any,
               batch_inputs: dict[str, torch.Tensor], *, mse_weight: float = 1000.0, gqa_rule: str = "sum",
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(loss, lm_loss, mse)`` of the student with the translated teacher neurons added.

    ``loss = lm_loss + mse_weight * mse``; ``lm_loss`` is the student's mean token loss on the
    batch (``batch_inputs`` holds input_ids, attention_mask, labels), ``mse`` the sum over
    modules of mean(translated^2). Differentiable in the translator's weights only.
    """
    translated = translator(teacher_slice.weights)
    mse = translation_penalty(translated).to(next(student.parameters()).device)
    deltas = pair_deltas(translated, student_selection)
    out = forward_injected(student, deltas, gqa_rule=gqa_rule, **batch_inputs)
    lm = out.loss.float()
    return lm + mse_weight * mse, lm, mse


def _batch(examples: list[Example], tok, cfg: LatenConfig, device) -> dict[str, torch.Tensor]:
    items = [tokenize_example(tok, pa, max_length=cfg.max_length, train_on_inputs=cfg.train_on_inputs)
             for pa in prompt_answer_pairs(examples, tokenizer=tok, template=cfg.template)]
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    return {k: v.to(device) for k, v in collate(items, pad).model_inputs().items()}


def _align_examples(example: Example, align: list[Example], cfg: LatenConfig, step: int) -> list[Example]:
    """The extract example plus P-1 align examples drawn without replacement, seeded by (seed, step)."""
    rng = random.Random(f"laten-align-{cfg.seed}-{step}")
    n = min(cfg.align_batch - 1, len(align))
    return [example] + rng.sample(align, n)


def _micro(examples: list[Example], cfg: LatenConfig) -> list[list[Example]]:
    m = cfg.micro_batch or len(examples)
    return [examples[i:i + m] for i in range(0, len(examples), m)]


def _losses(translator, located: Located, student, student_tok, examples, cfg: LatenConfig, *, backward: bool,
            ) -> tuple[float, float, float]:
    """Loss, LM loss and MSE averaged over micro-batches; backpropagates if ``backward``."""
    device = next(student.parameters()).device
    parts = _micro(examples, cfg)
    tot = lm_tot = mse_tot = 0.0
    for mb in parts:
        inputs = _batch(mb, student_tok, cfg, device)
        with torch.set_grad_enabled(backward):
            loss, lm, mse = laten_loss(translator, located.teacher_slice, student, located.student_selection, inputs,
                                       mse_weight=cfg.mse_weight, gqa_rule=cfg.gqa_rule)
            if backward:
                (loss / len(parts)).backward()
        tot += float(loss.detach()) / len(parts)
        lm_tot += float(lm.detach()) / len(parts)
        mse_tot += float(mse.detach()) / len(parts)
    return tot, lm_tot, mse_tot


@torch.no_grad()
def _plain_lm_loss(student, student_tok, examples, cfg: LatenConfig) -> float:
    device = next(student.parameters()).device
    parts = _micro(examples, cfg)
    return sum(float(student(**_batch(mb, student_tok, cfg, device)).loss) for mb in parts) / len(parts)


def _step_losses(translator: Translator, located: Located, student: nn.Module, student_tok,
                 examples: list[Example], cfg: LatenConfig) -> dict[str, float]:
    """The gradients of one alignment step on ``examples`` (into the translator) and its losses."""
    translator.train()
    loss, lm, mse = _losses(translator, located, student, student_tok, examples, cfg, backward=True)
    return {"lm_loss": lm, "mse": mse, "loss": loss}


def _losses_after(translator: Translator, located: Located, student: nn.Module, student_tok,
                  examples: list[Example], cfg: LatenConfig) -> dict[str, float]:
    """The same batch's losses once the translator moved, and the student's own LM loss on it."""
    translator.eval()
    loss_after, lm_after, mse_after = _losses(translator, located, student, student_tok, examples, cfg, backward=False)
    return {"lm_loss_after": lm_after, "mse_after": mse_after, "loss_after": loss_after,
            "student_lm_loss": _plain_lm_loss(student, student_tok, examples, cfg)}


# ======================================================================== checkpoints


def find_checkpoint(path: str | os.PathLike, step: int | None = None) -> Path:
    """A translator folder: ``path`` itself, or ``path/checkpoint_<step>`` (default: the last)."""
    p = Path(path)
    if step is None and (p / WEIGHTS_NAME).is_file():
        return p
    saved = saved_steps(p) if p.is_dir() else []
    if not saved:
        raise PktError(f"no translator checkpoint in {p} (expected {WEIGHTS_NAME} or checkpoint_<step>/ folders)")
    if step is None:
        step = saved[-1]
    if step not in saved:
        raise PktError(f"{p} has no checkpoint_{step}; saved steps: {saved}")
    return p / f"checkpoint_{step}"


def _settings(cfg: LatenConfig, budget: tuple[int, int, int]) -> dict[str, Any]:
    """What a checkpoint must be applied with (the locate/inject settings and the budget they give)."""
    n_layers, k_ffn, k_attn = budget
    return {**{k: getattr(cfg, k) for k in APPLY_SETTINGS}, "n_layers": n_layers, "k_ffn": k_ffn,
            "k_attn": k_attn, "modules": list(cfg.modules), "task": cfg.task, "train_on_inputs": cfg.train_on_inputs}


def read_settings(checkpoint: str | os.PathLike) -> dict[str, Any] | None:
    """The settings stored with a translator checkpoint (``laten_settings.json``), else those of
    its run folder's ``laten_config.json`` (checkpoints written before settings were stored), else None."""
    ck = Path(checkpoint)
    if (ck / SETTINGS_NAME).is_file():
        return read_json(ck / SETTINGS_NAME)
    run = ck.parent / CONFIG_NAME
    if run.is_file():
        cfg = read_json(run).get("config", {})
        return {k: cfg[k] for k in APPLY_SETTINGS if k in cfg} or None
    return None


def _translator_checkpoint(translator: Translator, settings: dict[str, Any]) -> Checkpointed:
    """The translator's own files (``translator.safetensors``, ``translator.json``) and the settings
    it must be applied with (``laten_settings.json``) in each checkpoint."""
    def save(folder: Path) -> None:
        save_translator(translator, folder)
        write_json(folder / SETTINGS_NAME, settings)

    return Checkpointed(save=save, load=lambda folder: translator.load_state_dict(load_translator(folder).state_dict()))


# ======================================================================== training


@dataclass
class TrainResult:
    out_dir: Path
    config: LatenConfig
    log: list[dict[str, Any]]
    checkpoints: list[Path]
    resumed_from: int  # last step found on disk when the call started (0: fresh run)

    @property
    def final(self) -> Path:
        return self.checkpoints[-1]


def train(teacher: Any, student: Any, task: str, *, transfer_rate: float = 0.1, steps: int | None = None,
          align_batch: int = 16, lr: float = 3e-5, seed: int = 42, out_dir: str | os.PathLike,
          train_on_inputs: bool | None = None, progress: bool = True, schedule_steps: int | None = None,
          micro_batch: int | None = None, max_length: int = 512, gqa_rule: str = "sum", normaliser: str = "rms",
          cache_dir: str | os.PathLike | None = None, device: str | None = None,
          extract: list[Example] | None = None, align: list[Example] | None = None,
          modules: Sequence[str] = TRANSFERRED_MODULES, attn_coefficient: str = "summed",
          mse_weight: float = 1000.0, template: str = "default", diagnostics: bool = True) -> TrainResult:
    """Train a LaTen translator from ``teacher`` to ``student`` on ``task`` (DESIGN.md 4.3).

    ``teacher``/``student``: model directories / hub ids (loaded by
    :func:`pktlib.models.resolve_model`, float32), or loaded ``(model, tokenizer)`` pairs.
    ``modules``: the transferred modules, up/down/v/o by default (the authors' Llama script);
    a pair's choice is ``pktlib.pairs.Pair.modules`` (their Qwen script leaves out v_proj).
    ``steps`` defaults to paper Table 5 (:func:`default_steps`). ``out_dir`` is a run folder of
    :mod:`pktlib.training`: ``laten_config.json``, ``log.jsonl`` (one JSON line per step: LM loss,
    MSE, batch loss before and after the step, the plain student's LM loss, learning rate, wall
    time, selected layers) and ``checkpoint_<step>/`` (translator + optimiser/RNG state) after
    every step. Calling it again on the same ``out_dir`` resumes after the last complete
    checkpoint (the settings must match). ``cache_dir`` (default ``out_dir/attributions``) keeps
    the per-example attributions; ``extract``/``align`` override the task's splits.
    ``train_on_inputs=None`` takes the task family's default (:func:`default_train_on_inputs`).
    ``mse_weight``: the weight of the penalty sum_m mean(translated_m^2) in the loss (DESIGN.md 4.3
    and the original code: 1000; 0 trains on the LM loss alone). ``template``: the prompt format
    of both attribution and the LM loss ("default", the original code's; "auto" for a chat pair,
    whose evaluation prompts use its chat template). ``diagnostics=False`` leaves out of the log the
    batch's losses after the step and the plain student's loss on it (two more forward passes of the
    batch, about 40% of a step's time: worth saving at a real model's size on a CPU). Every checkpoint folder also holds ``laten_settings.json`` (module docstring). Works inside
    ``torch.no_grad()`` (the loop enables gradients).
    """
    out = Path(out_dir)
    extract = list(extract) if extract is not None else load_task(task, "extract")
    align = list(align) if align is not None else load_task(task, "align")
    steps = steps or default_steps(task)
    if steps > len(extract):
        raise PktError(f"steps={steps} needs {steps} extract examples, but {task!r} has {len(extract)}")
    cfg = LatenConfig(task=task, steps=steps, schedule_steps=schedule_steps or max(len(extract), steps),
                      transfer_rate=transfer_rate, align_batch=align_batch, micro_batch=micro_batch, lr=lr, seed=seed,
                      train_on_inputs=default_train_on_inputs(task) if train_on_inputs is None else train_on_inputs,
                      max_length=max_length, gqa_rule=gqa_rule, normaliser=normaliser,
                      attn_coefficient=attn_coefficient, modules=tuple(modules), mse_weight=mse_weight,
                      template=template)
    t_model, t_tok, t_src = resolve_model(teacher, device=device, need_tokenizer=True)
    s_model, s_tok, s_src = resolve_model(student, device=device or next(t_model.parameters()).device,
                                          need_tokenizer=True)
    ts, ss = check_pair(t_model, s_model, modules=cfg.modules)
    ids = (weights_hash(t_model), weights_hash(s_model))
    # The number of steps and the micro-batching may change between calls; nothing else may.
    run = RunDir(out, {"config": asdict(cfg),
                       "teacher": {"source": t_src, "weights_sha256": ids[0], "spec": ts.to_dict()},
                       "student": {"source": s_src, "weights_sha256": ids[1], "spec": ss.to_dict()}},
                 settings_name=CONFIG_NAME, free=("config.steps", "config.micro_batch", "teacher.source",
                                                  "teacher.spec", "student.source", "student.spec"),
                 # a setting added since that run was saved counts as its default there
                 defaults={f"config.{f.name}": f.default for f in fields(LatenConfig) if f.default is not MISSING})
    settings = _settings(cfg, layer_budget(ts, ss, cfg.transfer_rate))

    torch.manual_seed(seed)
    translator = Translator(TranslatorConfig(ts.hidden_size, ss.hidden_size, cfg.modules),
                            generator=torch.Generator().manual_seed(seed)).to(next(s_model.parameters()).device)
    optimizer = torch.optim.AdamW(translator.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=cfg.betas)
    cache = cache_dir if cache_dir is not None else out / "attributions"
    current: dict[str, Any] = {}  # the step's located neurons and batch, shared by step and after

    def step(i: int) -> dict[str, Any]:
        t0 = time.perf_counter()
        ex = extract[i]
        located = locate(t_model, t_tok, s_model, s_tok, ex, transfer_rate=cfg.transfer_rate,
                         normaliser=cfg.normaliser, attn_coefficient=cfg.attn_coefficient, cache_dir=cache,
                         ids=ids, modules=cfg.modules, template=cfg.template)
        batch = _align_examples(ex, align, cfg, i + 1)
        current.update(t0=t0, located=located, batch=batch, t_step=time.perf_counter())
        return {"example": ex.id or i, **_step_losses(translator, located, s_model, s_tok, batch, cfg)}

    def after(i: int, row: dict[str, Any]) -> None:
        located, batch = current["located"], current["batch"]
        row["step_s"] = round(time.perf_counter() - current["t_step"], 4)  # backward and optimiser step
        if diagnostics:
            row.update(_losses_after(translator, located, s_model, s_tok, batch, cfg))
        row.update({"batch_size": len(batch), "attribution_s": round(located.seconds, 3),
                    "teacher_ffn_layers": located.teacher_selection.ffn_layers,
                    "teacher_attn_layers": located.teacher_selection.attn_layers,
                    "student_ffn_layers": located.student_selection.ffn_layers,
                    "student_attn_layers": located.student_selection.attn_layers,
                    "wall_s": round(time.perf_counter() - current["t0"], 3)})

    grad_flags = [p.requires_grad for p in s_model.parameters()]
    s_model.requires_grad_(False)  # gradients must reach the translator only
    t_was, s_was = t_model.training, s_model.training
    t_model.eval(), s_model.eval()
    try:
        done = train_steps(optimizer, step, steps=steps, after=after, run=run,
                           schedule=Schedule("one-cycle", cfg.lr, cfg.schedule_steps, {"warmup": cfg.warmup_pct}),
                           checkpointed=_translator_checkpoint(translator, settings),
                           progress=f"LaTen {task}" if progress else None, postfix=("lm_loss", "mse"))
    finally:
        for p, g in zip(s_model.parameters(), grad_flags):
            p.requires_grad_(g)
        t_model.train(t_was), s_model.train(s_was)
    return TrainResult(out, cfg, done.log, [run.checkpoint(s) for s in run.saved_steps() if s <= steps],
                       done.resumed_from)
