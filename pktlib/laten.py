"""LaTen (Locate-Then-Align): pre-align parametric knowledge transfer (DESIGN.md 4.3).

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
5. AdamW step on the translator only, save it to ``out_dir/checkpoint_<step>/``.

Inference (:func:`apply`): attribute one unseen example in both models, translate it with a
saved checkpoint, add the result permanently, save the student and a record of the change.

Deviations from the original code, all deliberate and small:

* The one-cycle schedule (the curve of ``OneCycleLR``: 10% warm-up, cosine, ``div_factor=25``,
  ``final_div_factor=1`` as in the original; :func:`one_cycle`) spans ``schedule_steps``, by
  default the size of the extract set as in the original (which trains on every extract example
  and then picks the checkpoint of paper Table 5); training stops after ``steps``. AdamW's betas
  stay at (0.9, 0.95) as specified (``OneCycleLR``'s default, used by the original, also cycles
  beta1 between 0.85 and 0.95).
* The P - 1 align examples of step s are drawn with a ``random.Random`` seeded by
  ``(seed, s)`` (the original seeds with ``s`` alone), so different seeds see different batches
  and a resumed run draws exactly what an uninterrupted one would.
* Shared value rows under grouped-query attention: see :mod:`pktlib.injection` (``gqa_rule``).
* Everything is computed in the models' dtype; the translator in float32 (as the original).

``train_on_inputs`` defaults per task family: on for knowledge (MMLU-like) tasks, as the
original code's README requires for MMLU ("the original answer part is only 1 character which
is hard to calculate stable gradient"), off otherwise.

A run's locate-and-inject settings (transfer rate, attribution normaliser and attention
coefficient, GQA rule, and the layer/neuron budget they give) are stored with every translator
checkpoint (``laten_settings.json``); :func:`apply` uses them, and an explicit argument that
disagrees with them is an error rather than a silent mismatch.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import random
import time
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from pktlib.data import Example, collate, load_task, prompt_answer_pairs, task_info, tokenize_example
from pktlib.errors import PktError
from pktlib.hooks import with_grad
from pktlib.extraction import LATEN_MODULES, NeuronSlice, slice_neurons
from pktlib.hypernet import Translator, TranslatorConfig, load_translator, save_translator, translation_penalty
from pktlib.injection import GQA_RULES, ChangeRecord, forward_injected, inject_, pair_deltas
from pktlib.models import ModelSpec, load_model, spec, weights_hash
from pktlib.records import atomic_dir, atomic_write_text, read_json, write_json

__all__ = [
    "TABLE5_STEPS", "FAMILY_STEPS", "default_steps", "LatenConfig", "check_pair", "Located", "locate",
    "laten_loss", "alignment_step", "one_cycle", "cached_attribution", "TrainResult", "train", "ApplyResult", "apply",
    "find_checkpoint", "read_log", "read_settings", "default_train_on_inputs", "SETTINGS_NAME",
    "MemoryEstimate", "memory_estimate", "SweepRow", "sweep", "scale_matched_lr",
]

# Paper Table 5: alignment steps (extract examples) per task.
TABLE5_STEPS: dict[str, int] = {"mmlu": 2, "gsm8k": 4, "humaneval": 3, "mbpp": 8}
# The pocket suite's families take the step count of their paper counterpart (code: HumanEval's).
FAMILY_STEPS: dict[str, int] = {"knowledge": 2, "math": 4, "code": 3}

LOG_NAME = "log.jsonl"
CONFIG_NAME = "laten_config.json"
STATE_NAME = "train_state.pt"
SETTINGS_NAME = "laten_settings.json"  # beside each checkpoint's translator: what apply() must reuse
# The settings apply() takes from a checkpoint (the others, like lr, only matter for training).
APPLY_SETTINGS = ("transfer_rate", "normaliser", "attn_coefficient", "gqa_rule")


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
    modules: tuple[str, ...] = LATEN_MODULES

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
        if self.micro_batch is not None and self.micro_batch < 1:
            raise PktError(f"`micro_batch` must be >= 1, got {self.micro_batch}")
        if self.gqa_rule not in GQA_RULES:
            raise PktError(f"`gqa_rule` must be one of {GQA_RULES}, got {self.gqa_rule!r}")
        _check_locate_settings(self.normaliser, self.attn_coefficient)


def _check_locate_settings(normaliser: str, attn_coefficient: str) -> None:
    from pktlib.attribution import ATTN_COEFFICIENTS, NORMALISERS

    if normaliser not in NORMALISERS:
        raise PktError(f"`normaliser` must be one of {sorted(NORMALISERS)}, got {normaliser!r}")
    if attn_coefficient not in ATTN_COEFFICIENTS:
        raise PktError(f"`attn_coefficient` must be one of {list(ATTN_COEFFICIENTS)}, got {attn_coefficient!r}")


# ======================================================================== models


def _as_model(x: Any, device: str | torch.device | None) -> tuple[nn.Module, Any, str]:
    """``(model, tokenizer, source)`` from a path/hub id or a loaded ``(model, tokenizer)``."""
    if isinstance(x, (tuple, list)) and len(x) == 2 and isinstance(x[0], nn.Module):
        model, tok = x
        src = str(getattr(model, "name_or_path", "") or getattr(model.config, "_name_or_path", "") or "<in memory>")
        return (model.to(device) if device is not None else model), tok, src
    if isinstance(x, (str, os.PathLike)):
        model, tok = load_model(x, device=str(device or "cpu"))
        return model, tok, str(x)
    raise PktError(f"expected a model path/hub id or a (model, tokenizer) pair, got {type(x).__name__}")


def check_pair(teacher: nn.Module | ModelSpec, student: nn.Module | ModelSpec, *,
               modules: Sequence[str] = LATEN_MODULES) -> tuple[ModelSpec, ModelSpec]:
    """Specs of a teacher/student pair LaTen can work with; a clear :class:`PktError` otherwise.

    The teacher must be at least as wide as the student (hidden size, FFN size and attention
    size), both must have the same ``head_dim`` (attention neurons are paired position by
    position inside a head), and both must have every transferred module.
    """
    ts = teacher if isinstance(teacher, ModelSpec) else spec(teacher)
    ss = student if isinstance(student, ModelSpec) else spec(student)
    if ts.head_dim != ss.head_dim:
        raise PktError(f"teacher head_dim {ts.head_dim} != student head_dim {ss.head_dim}: LaTen pairs attention "
                       "neurons inside heads, so both models need the same head_dim")
    narrower = [f"{name} {a} < {b}" for name, a, b in (
        ("hidden_size", ts.hidden_size, ss.hidden_size),
        ("intermediate_size", ts.intermediate_size, ss.intermediate_size),
        ("n_heads*head_dim", ts.attn_size, ss.attn_size)) if a < b]
    if narrower:
        raise PktError(f"the teacher is narrower than the student ({', '.join(narrower)}); LaTen maps a larger "
                       "model into a smaller one (swap teacher and student?)")
    for role, m, s in (("teacher", teacher, ts), ("student", student, ss)):
        if isinstance(m, nn.Module):
            for name in modules:
                try:
                    w = s.weight(m, 0, name)
                except AttributeError:
                    raise PktError(f"the {role} ({s.arch}) has no module {name!r} at {s.module_path(0, name)}; "
                                   f"LaTen transfers {list(modules)}") from None
                if not isinstance(w, torch.Tensor) or w.dim() != 2:
                    raise PktError(f"the {role}'s {s.module_path(0, name)} has no 2-D weight")
    return ts, ss


# ======================================================================== locate


@dataclass
class Located:
    """The teacher's extracted neurons and the student's receiving neurons for one example."""

    teacher_slice: NeuronSlice
    student_selection: Any  # pktlib.attribution.Selection
    teacher_selection: Any
    seconds: float


def _example_key(pair: tuple[str, str], normaliser: str, attn_coefficient: str = "summed") -> str:
    # The definition's coefficient keeps the key it had before the variant existed.
    parts = [*pair, normaliser] + ([attn_coefficient] if attn_coefficient != "summed" else [])
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:20]


def cached_attribution(model: nn.Module, tokenizer, pair: tuple[str, str], *, model_id: str,
                       cache_dir: str | os.PathLike | None, normaliser: str = "rms",
                       attn_coefficient: str = "summed"):
    """Attribution of one (prompt, answer) pair, read from / written to ``cache_dir`` if given.

    Scores do not depend on the transfer rate, the seed or the step, so sweeps reuse them; the
    file name holds the model's weights hash and a hash of the text.
    """
    from pktlib.attribution import attribute, load_attribution, save_attribution

    key = _example_key(pair, normaliser, attn_coefficient)
    path = Path(cache_dir) / f"{model_id}-{key}.safetensors" if cache_dir else None
    if path is not None and path.is_file():
        return load_attribution(path)
    attr = attribute(model, tokenizer, [pair], normaliser=normaliser, attn_coefficient=attn_coefficient)
    if path is not None:
        save_attribution(attr, path)
    return attr


def locate(teacher: nn.Module, teacher_tok, student: nn.Module, student_tok, example: Example, *,
           transfer_rate: float, normaliser: str = "rms", attn_coefficient: str = "summed",
           cache_dir: str | os.PathLike | None = None, ids: tuple[str, str] | None = None,
           modules: Sequence[str] = LATEN_MODULES) -> Located:
    """Attribute ``example`` in both models, select neurons, slice the teacher's (DESIGN.md 4.3)."""
    from pktlib.attribution import layer_budget, select

    t0 = time.perf_counter()
    ts, ss = spec(teacher), spec(student)
    n_layers, k_ffn, k_attn = layer_budget(ts, ss, transfer_rate)
    t_id, s_id = ids or (weights_hash(teacher), weights_hash(student))
    pair_t = prompt_answer_pairs([example])[0]
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
    items = [tokenize_example(tok, ex, max_length=cfg.max_length, train_on_inputs=cfg.train_on_inputs)
             for ex in examples]
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


@with_grad
def alignment_step(translator: Translator, optimizer, scheduler, located: Located, student: nn.Module, student_tok,
                   examples: list[Example], cfg: LatenConfig) -> dict[str, float]:
    """One optimiser step of the translator on ``examples``; the batch loss before and after it."""
    lr_used = scheduler.get_last_lr()[0]
    translator.train()
    optimizer.zero_grad(set_to_none=True)
    t0 = time.perf_counter()
    loss, lm, mse = _losses(translator, located, student, student_tok, examples, cfg, backward=True)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    step_s = time.perf_counter() - t0
    translator.eval()
    loss_after, lm_after, mse_after = _losses(translator, located, student, student_tok, examples, cfg, backward=False)
    return {"lr": lr_used, "lm_loss": lm, "mse": mse, "loss": loss, "lm_loss_after": lm_after,
            "mse_after": mse_after, "loss_after": loss_after, "step_s": round(step_s, 4)}


# ======================================================================== checkpoints


def _ckpt_dir(out_dir: Path, step: int) -> Path:
    return out_dir / f"checkpoint_{step}"


def _saved_steps(out_dir: Path) -> list[int]:
    steps = []
    for p in out_dir.glob("checkpoint_*"):
        tail = p.name[len("checkpoint_"):]
        if p.is_dir() and tail.isdigit() and (p / STATE_NAME).is_file():
            steps.append(int(tail))
    return sorted(steps)


def find_checkpoint(path: str | os.PathLike, step: int | None = None) -> Path:
    """A translator folder: ``path`` itself, or ``path/checkpoint_<step>`` (default: the last)."""
    from pktlib.hypernet import WEIGHTS_NAME

    p = Path(path)
    if step is None and (p / WEIGHTS_NAME).is_file():
        return p
    saved = _saved_steps(p) if p.is_dir() else []
    if not saved:
        raise PktError(f"no translator checkpoint in {p} (expected {WEIGHTS_NAME} or checkpoint_<step>/ folders)")
    if step is None:
        return _ckpt_dir(p, saved[-1])
    if step not in saved:
        raise PktError(f"{p} has no checkpoint_{step}; saved steps: {saved}")
    return _ckpt_dir(p, step)


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


def _save_checkpoint(out_dir: Path, step: int, translator: Translator, optimizer, scheduler,
                     settings: dict[str, Any]) -> Path:
    """Write a complete checkpoint folder, then rename it into place (never a partial folder)."""
    final = _ckpt_dir(out_dir, step)
    with atomic_dir(final) as tmp:
        save_translator(translator, tmp)
        write_json(tmp / SETTINGS_NAME, settings)
        torch.save({"step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "torch_rng": torch.get_rng_state(), "python_rng": random.getstate()}, tmp / STATE_NAME)
    return final


def read_log(out_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The per-step records of a run (``log.jsonl``)."""
    p = Path(out_dir) / LOG_NAME
    if not p.is_file():
        return []
    return [json.loads(line) for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]


def _append_log(out_dir: Path, row: dict[str, Any]) -> None:
    rows = read_log(out_dir) + [row]
    atomic_write_text(out_dir / LOG_NAME, "".join(json.dumps(r) + "\n" for r in rows))


def one_cycle(i: int, total: int, warmup_pct: float = 0.1, div: float = 25.0, final_div: float = 1.0) -> float:
    """Learning-rate multiplier of update ``i`` (0-based) of a one-cycle schedule of ``total`` updates.

    The same curve as ``torch.optim.lr_scheduler.OneCycleLR(pct_start=warmup_pct,
    anneal_strategy="cos", div_factor=div, final_div_factor=final_div)`` (cosine from 1/div up to
    1 at update ``round(warmup_pct * total) - 1``, then cosine down to 1/(div * final_div)), but
    defined for every ``total`` (OneCycleLR divides by zero when ``warmup_pct * total`` is 1).
    """
    start, end = 1.0 / div, 1.0 / (div * final_div)
    peak = max(1, round(warmup_pct * total)) - 1
    if i <= peak:
        return 1.0 if peak == 0 else start + (1 - start) * (1 - math.cos(math.pi * i / peak)) / 2
    p = min(1.0, (i - peak) / max(1, total - 1 - peak))
    return end + (1 - end) * (1 + math.cos(math.pi * p)) / 2


def _make_optim(translator: Translator, cfg: LatenConfig):
    opt = torch.optim.AdamW(translator.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=cfg.betas)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: one_cycle(i, cfg.schedule_steps, cfg.warmup_pct))
    return opt, sched


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


@with_grad
def train(teacher: Any, student: Any, task: str, *, transfer_rate: float = 0.1, steps: int | None = None,
          align_batch: int = 16, lr: float = 3e-5, seed: int = 42, out_dir: str | os.PathLike,
          train_on_inputs: bool | None = None, progress: bool = True, schedule_steps: int | None = None,
          micro_batch: int | None = None, max_length: int = 512, gqa_rule: str = "sum", normaliser: str = "rms",
          attn_coefficient: str = "summed", cache_dir: str | os.PathLike | None = None, device: str | None = None,
          extract: list[Example] | None = None, align: list[Example] | None = None,
          modules: Sequence[str] = LATEN_MODULES) -> TrainResult:
    """Train a LaTen translator from ``teacher`` to ``student`` on ``task`` (DESIGN.md 4.3).

    ``teacher``/``student``: model directories / hub ids, or loaded ``(model, tokenizer)``.
    ``modules``: the transferred modules, up/down/v/o by default (the authors' Llama script);
    a pair's choice is ``pktlib.pairs.Pair.modules`` (their Qwen script leaves out v_proj).
    ``steps`` defaults to paper Table 5 (:func:`default_steps`). Writes into ``out_dir``:
    ``laten_config.json``, ``log.jsonl`` (one JSON line per step: LM loss, MSE, batch loss
    before and after the step, the plain student's LM loss, learning rate, wall time, selected
    layers) and ``checkpoint_<step>/`` (translator + optimiser/scheduler/RNG state) after every
    step. Calling it again on the same ``out_dir`` resumes after the last complete checkpoint
    (the settings must match). ``cache_dir`` (default ``out_dir/attributions``) keeps the
    per-example attributions; ``extract``/``align`` override the task's splits.
    ``train_on_inputs=None`` takes the task family's default (:func:`default_train_on_inputs`).
    Every checkpoint folder also holds ``laten_settings.json`` (module docstring). Works inside
    ``torch.no_grad()`` (gradients are enabled for the call).
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
                      attn_coefficient=attn_coefficient, modules=tuple(modules))
    t_model, t_tok, t_src = _as_model(teacher, device)
    s_model, s_tok, s_src = _as_model(student, device or next(t_model.parameters()).device)
    ts, ss = check_pair(t_model, s_model, modules=cfg.modules)
    ids = (weights_hash(t_model), weights_hash(s_model))
    from pktlib.attribution import layer_budget

    settings = _settings(cfg, layer_budget(ts, ss, cfg.transfer_rate))

    out.mkdir(parents=True, exist_ok=True)
    meta = {"config": asdict(cfg), "teacher": {"source": t_src, "weights_sha256": ids[0], "spec": ts.to_dict()},
            "student": {"source": s_src, "weights_sha256": ids[1], "spec": ss.to_dict()}}
    cfg_path = out / CONFIG_NAME
    if cfg_path.is_file():
        old = read_json(cfg_path)
        # A setting added since that run was saved counts as its default there.
        saved = {**{f.name: f.default for f in fields(LatenConfig) if f.default is not MISSING},
                 **old["config"]}
        saved = json.loads(json.dumps(saved))
        diff = {k: (saved.get(k), v) for k, v in json.loads(json.dumps(meta["config"])).items()
                if saved.get(k) != v and k not in ("steps", "micro_batch")}
        if old["teacher"]["weights_sha256"] != ids[0] or old["student"]["weights_sha256"] != ids[1]:
            diff["models"] = "teacher/student weights differ"
        if diff:
            raise PktError(f"{out} holds a LaTen run with other settings (saved, now): {diff}; use another out_dir")
    write_json(cfg_path, meta)

    torch.manual_seed(seed)
    translator = Translator(TranslatorConfig(ts.hidden_size, ss.hidden_size, cfg.modules),
                            generator=torch.Generator().manual_seed(seed)).to(next(s_model.parameters()).device)
    optimizer, scheduler = _make_optim(translator, cfg)
    saved = [s for s in _saved_steps(out) if s <= steps]
    start = saved[-1] if saved else 0
    if start:
        ck = _ckpt_dir(out, start)
        translator.load_state_dict(load_translator(ck).state_dict())
        state = torch.load(ck / STATE_NAME, weights_only=False)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        random.setstate(state["python_rng"])
    # Keep only the log rows of saved steps: a crash between the log write and the checkpoint
    # leaves a row that the resumed run writes again.
    kept = [r for r in read_log(out) if r["step"] <= start]
    atomic_write_text(out / LOG_NAME, "".join(json.dumps(r) + "\n" for r in kept))

    cache = cache_dir if cache_dir is not None else out / "attributions"
    grad_flags = [p.requires_grad for p in s_model.parameters()]
    s_model.requires_grad_(False)  # gradients must reach the translator only
    t_was, s_was = t_model.training, s_model.training
    t_model.eval(), s_model.eval()
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, initial=start, desc=f"LaTen {task}", unit="step")
    try:
        for step in range(start + 1, steps + 1):
            t0 = time.perf_counter()
            ex = extract[step - 1]
            located = locate(t_model, t_tok, s_model, s_tok, ex, transfer_rate=cfg.transfer_rate,
                             normaliser=cfg.normaliser, attn_coefficient=cfg.attn_coefficient, cache_dir=cache,
                             ids=ids, modules=cfg.modules)
            batch = _align_examples(ex, align, cfg, step)
            stats = alignment_step(translator, optimizer, scheduler, located, s_model, s_tok, batch, cfg)
            row = {
                "step": step, "example": ex.id or step - 1, **stats,
                "student_lm_loss": _plain_lm_loss(s_model, s_tok, batch, cfg),
                "batch_size": len(batch), "attribution_s": round(located.seconds, 3),
                "teacher_ffn_layers": located.teacher_selection.ffn_layers,
                "teacher_attn_layers": located.teacher_selection.attn_layers,
                "student_ffn_layers": located.student_selection.ffn_layers,
                "student_attn_layers": located.student_selection.attn_layers,
                "wall_s": round(time.perf_counter() - t0, 3),
            }
            _append_log(out, row)
            _save_checkpoint(out, step, translator, optimizer, scheduler, settings)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(lm=f"{stats['lm_loss']:.4f}", mse=f"{stats['mse']:.2e}")
    finally:
        if bar is not None:
            bar.close()
        for p, g in zip(s_model.parameters(), grad_flags):
            p.requires_grad_(g)
        t_model.train(t_was), s_model.train(s_was)
    return TrainResult(out, cfg, read_log(out), [_ckpt_dir(out, s) for s in _saved_steps(out) if s <= steps], start)


# ======================================================================== inference


@dataclass
class ApplyResult:
    model: nn.Module  # the injected student
    tokenizer: Any
    record: ChangeRecord
    out_dir: Path | None


def _apply_settings(ck: Path, given: dict[str, Any]) -> dict[str, Any]:
    """The locate/inject settings for applying checkpoint ``ck``: the stored ones, with the given
    (non-None) ones checked against them; defaults only for a checkpoint that stored none."""
    stored = read_settings(ck) or {}
    defaults = {"transfer_rate": 0.1, "normaliser": "rms", "attn_coefficient": "summed", "gqa_rule": "sum"}
    def same(a, b) -> bool:
        return a == b or (isinstance(a, float) and isinstance(b, float) and math.isclose(a, b))

    clash = {k: (stored[k], v) for k, v in given.items() if v is not None and k in stored and not same(v, stored[k])}
    if clash:
        detail = ", ".join(f"{k}={v!r} but the translator was trained with {k}={s!r}" for k, (s, v) in clash.items())
        raise PktError(f"{ck}: {detail}; leave these unset to use the translator's own settings")
    out = {k: (stored[k] if k in stored else given.get(k) if given.get(k) is not None else defaults[k])
           for k in APPLY_SETTINGS}
    _check_locate_settings(out["normaliser"], out["attn_coefficient"])
    if out["gqa_rule"] not in GQA_RULES:
        raise PktError(f"`gqa_rule` must be one of {GQA_RULES}, got {out['gqa_rule']!r}")
    return {**out, **{k: stored[k] for k in ("n_layers", "k_ffn", "k_attn") if k in stored}}


def apply(teacher: Any, student: Any, translator_dir: str | os.PathLike, *, task: str, split: str = "train",
          example_index: int = 0, transfer_rate: float | None = None, out_dir: str | os.PathLike | None,
          step: int | None = None, gqa_rule: str | None = None, normaliser: str | None = None,
          attn_coefficient: str | None = None, cache_dir: str | os.PathLike | None = None,
          device: str | None = None, inplace: bool = False, example: Example | None = None,
          progress: bool = True) -> ApplyResult:
    """Transfer with a trained translator: locate one unseen example, translate, inject for good.

    ``translator_dir`` is a checkpoint folder or a run folder (then ``step``, default the last
    checkpoint). The example is ``load_task(task, split)[example_index]`` unless ``example`` is
    given. Saves the injected student (HF format, with its tokenizer) and ``changes.json``
    into ``out_dir`` (``None``: nothing saved). A loaded student is copied first unless
    ``inplace``. ``transfer_rate``, ``gqa_rule``, ``normaliser`` and ``attn_coefficient`` come
    from the checkpoint's stored settings (:func:`read_settings`); passing one that differs
    from them raises :class:`PktError` (for an old checkpoint without settings, the given
    values or the defaults 0.1 / "sum" / "rms" / "summed" are used).
    """
    import copy

    ck = find_checkpoint(translator_dir, step)
    how = _apply_settings(ck, {"transfer_rate": transfer_rate, "normaliser": normaliser,
                               "attn_coefficient": attn_coefficient, "gqa_rule": gqa_rule})
    transfer_rate, gqa_rule = how["transfer_rate"], how["gqa_rule"]
    t_model, t_tok, t_src = _as_model(teacher, device)
    s_model, s_tok, s_src = _as_model(student, device or next(t_model.parameters()).device)
    if isinstance(student, (tuple, list)) and not inplace:
        s_model = copy.deepcopy(s_model)
    ts, ss = check_pair(t_model, s_model)
    translator = load_translator(ck, device=next(s_model.parameters()).device)
    c = translator.config
    if (c.d_teacher, c.d_student) != (ts.hidden_size, ss.hidden_size):
        raise PktError(f"translator {ck} maps hidden size {c.d_teacher} -> {c.d_student}, but the pair is "
                       f"{ts.hidden_size} -> {ss.hidden_size}")
    if example is None:
        examples = load_task(task, split)
        if not 0 <= example_index < len(examples):
            raise PktError(f"example_index {example_index} out of range: {task!r} split {split!r} has {len(examples)}")
        example = examples[example_index]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=3, desc="LaTen apply", unit="stage")
    t0 = time.perf_counter()
    from pktlib.attribution import layer_budget

    budget = layer_budget(ts, ss, transfer_rate)
    if "n_layers" in how and budget != (how["n_layers"], how["k_ffn"], how["k_attn"]):
        raise PktError(f"{ck} was trained with (layers, FFN k, attention k) = "
                       f"{(how['n_layers'], how['k_ffn'], how['k_attn'])}, but this pair gives {budget}")
    located = locate(t_model, t_tok, s_model, s_tok, example, transfer_rate=transfer_rate,
                     normaliser=how["normaliser"], attn_coefficient=how["attn_coefficient"], cache_dir=cache_dir,
                     modules=c.modules)
    if bar is not None:
        bar.update(1)
    with torch.no_grad():
        translated = translator(located.teacher_slice.weights)
        record = inject_(s_model, pair_deltas(translated, located.student_selection), gqa_rule=gqa_rule)
    if bar is not None:
        bar.update(1)
    record.meta.update({
        "task": task, "split": split, "example_index": example_index, "example_id": example.id,
        "transfer_rate": transfer_rate, "gqa_rule": gqa_rule, "normaliser": how["normaliser"],
        "attn_coefficient": how["attn_coefficient"], "translator": str(ck), "teacher": t_src, "student": s_src,
        "teacher_ffn_layers": located.teacher_selection.ffn_layers,
        "teacher_attn_layers": located.teacher_selection.attn_layers,
        "student_ffn_layers": located.student_selection.ffn_layers,
        "student_attn_layers": located.student_selection.attn_layers,
        "translated_rms": {m: float(t.pow(2).mean().sqrt()) for m, t in translated.items()},
        "seconds": round(time.perf_counter() - t0, 3),
    })
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        with atomic_dir(out) as tmp:
            s_model.save_pretrained(tmp)
            s_tok.save_pretrained(tmp)
            write_json(tmp / "changes.json", record.to_dict())
    if bar is not None:
        bar.update(1)
        bar.close()
    return ApplyResult(s_model, s_tok, record, out)


# ======================================================================== memory


_BYTES = {"fp32": 4, "float32": 4, "bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2}


@dataclass
class MemoryEstimate:
    """Bytes one alignment step needs with both models on one device (estimates, not measurements)."""

    teacher_weights: int
    student_weights: int
    injected_weight_copies: int  # W + delta of every touched weight, kept for the backward pass
    activations: int  # student forward/backward on the batch (saved tensors + logits)
    translator: int  # float32 weights
    translator_grads: int
    optimizer_state: int  # AdamW: two float32 moments per translator weight
    extracted: int  # teacher slices and translated outputs (with their autograd buffers)
    attribution: int  # the largest (vocab x chunk) blocks of the logit-lens scoring
    detail: dict[str, Any] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(v for k, v in asdict(self).items() if isinstance(v, int))

    def table(self) -> list[tuple[str, float]]:
        """``[(part, GiB), ...]`` including the total."""
        rows = [(k, v / 2**30) for k, v in asdict(self).items() if isinstance(v, int)]
        return rows + [("total", self.total / 2**30)]


def memory_estimate(teacher: Any, student: Any, *, dtype: str = "bf16", batch: int = 16, seq_len: int = 512,
                    transfer_rate: float = 0.1, chunk_size: int = 4096) -> MemoryEstimate:
    """Estimate the memory of one LaTen alignment step (DESIGN.md 4.3) for a pair of configs/specs.

    Counts: both models' weights in ``dtype``; a copy of every injected weight (up, down, v, o of
    the student's ``L_sel`` layers: ``functional_call`` builds ``W + delta`` and autograd keeps it
    to propagate gradients to earlier layers); student activations saved for the backward pass,
    about ``(10 d + 4 I)`` values per token and layer plus float32 logits and their gradient
    (``2 x 4 V`` bytes per token); the float32 translator ``4 x (d_T^2 + d_T d_S)`` weights, its
    gradients and two AdamW moments; the extracted and translated neuron weights; and the
    attribution's ``(vocab x chunk_size)`` float32 blocks (a few at a time).
    """
    ts = teacher if isinstance(teacher, ModelSpec) else spec(teacher)
    ss = student if isinstance(student, ModelSpec) else spec(student)
    if dtype not in _BYTES:
        raise PktError(f"unknown dtype {dtype!r}; expected one of {sorted(_BYTES)}")
    b = _BYTES[dtype]
    n_sel = min(ts.n_layers, ss.n_layers)
    k_ffn = max(1, math.floor(transfer_rate * ss.intermediate_size + 1e-9))
    k_attn = max(1, math.floor(transfer_rate * ss.attn_size + 1e-9))
    dT, dS, I, V = ts.hidden_size, ss.hidden_size, ss.intermediate_size, ss.vocab_size
    touched = n_sel * (2 * dS * I + dS * ss.kv_size + dS * ss.attn_size)  # up, down, v, o weights
    tokens = batch * seq_len
    acts = ss.n_layers * tokens * (10 * dS + 4 * I) * b + tokens * V * 4 * 2
    n_tr = len(LATEN_MODULES) * (dT * dT + dT * dS)
    # Teacher slices (float32) + translated outputs (float32) + the MLP's hidden activations (d_T per neuron).
    n_neur = n_sel * 2 * (k_ffn + k_attn)  # neurons over up+down (k_ffn each) and v+o (k_attn each)
    extracted = n_neur * (dT + dS + dT) * 4
    attribution = 3 * max(ts.vocab_size, V) * min(chunk_size, max(ts.intermediate_size, ts.attn_size)) * 4
    return MemoryEstimate(
        teacher_weights=ts.n_parameters * b, student_weights=ss.n_parameters * b,
        injected_weight_copies=touched * b, activations=acts, translator=n_tr * 4, translator_grads=n_tr * 4,
        optimizer_state=n_tr * 8, extracted=extracted, attribution=attribution,
        detail={"dtype": dtype, "batch": batch, "seq_len": seq_len, "transfer_rate": transfer_rate,
                "n_layers_selected": n_sel, "k_ffn": k_ffn, "k_attn": k_attn, "translator_params": n_tr,
                "teacher_params": ts.n_parameters, "student_params": ss.n_parameters},
    )


# ======================================================================== sweeps (the chapter's tables)


def scale_matched_lr(lr: float, d_teacher: int, reference_d_teacher: int | None = None) -> float:
    """``lr`` rescaled so the translator's output after a few steps has a comparable size at d_T.

    Why: the weights start at N(0, 1e-5^2), so after ``s`` AdamW steps each has moved by at most
    about ``a = s * lr`` (Adam's step is ~lr whatever the gradient's scale). Along coherent update
    directions the two-layer output can then grow like ``a^2 * d_T^2 * |w|`` (an upper bound), so
    the same lr allows far larger deltas at d_T = 5120 (Llama-2-13B) than at a pocket-pair width.
    Keeping ``lr * d_T`` fixed keeps that bound's ``a * d_T`` fixed. A heuristic for comparing
    scales, not part of the paper's method. ``reference_d_teacher`` defaults to Llama-2-13B's width.
    """
    if reference_d_teacher is None:
        from pktlib.models import reference_spec

        reference_d_teacher = reference_spec("Llama-2-13b-chat").hidden_size
    return lr * reference_d_teacher / d_teacher


@dataclass
class SweepRow:
    """One evaluated model of a sweep: the student, the teacher, or LaTen at (rate, seed, step)."""

    task: str
    model: str  # "student", "teacher" or "laten"
    score: float
    n: int
    transfer_rate: float | None = None
    seed: int | None = None
    step: int | None = None
    example_id: str | None = None
    translated_rms: float | None = None  # root mean square of the injected deltas (all modules)
    changed_entries: int | None = None  # rows/columns that received a delta
    run_dir: str | None = None  # the translator's run folder (log.jsonl, checkpoints)


def _task_folder(task: str) -> str:
    """A folder name for ``task``: its name, or for a file path its stem plus a short hash."""
    if "/" in task or os.sep in task or task.endswith(".jsonl"):
        return f"{Path(task).stem}-{hashlib.sha256(task.encode()).hexdigest()[:8]}"
    return task.replace(":", "_")


def _key(row: dict[str, Any]) -> tuple:
    return (row["task"], row["model"], row.get("transfer_rate"), row.get("seed"), row.get("step"))


def sweep(teacher: Any, student: Any, task: str, *, seeds: Sequence[int] = (0, 1, 2),
          transfer_rates: Sequence[float] = (0.1,), main_rate: float = 0.1, steps: int | None = None,
          limit: int | None = 100, run_root: str | os.PathLike, split: str = "test", apply_split: str = "train",
          eval_kwargs: dict[str, Any] | None = None, baselines: bool = True, progress: bool = True,
          **train_kwargs) -> list[SweepRow]:
    """Train and evaluate LaTen over seeds x transfer rates (every checkpoint step at ``main_rate``,
    the last step at the other rates), next to the plain student and teacher.

    Each (rate, seed) trains its own translator in ``run_root/pair-<hashes>/<task>/rate<r>/seed<s>`` (a task given
    as a file path gets ``<stem>-<hash>`` as its folder) and applies it
    on the unseen example ``load_task(task, apply_split)[seed]``. Attributions are cached in
    ``run_root/attributions``. ``baselines=False`` skips scoring the student and the teacher. Rows are appended to ``run_root/<task>/results.jsonl`` as they come,
    and a rerun with the same settings skips rows already there (delete the folder to start over).
    """
    from pktlib.evaluation import evaluate

    root = Path(run_root)
    t_model, t_tok, t_src = _as_model(teacher, None)
    s_model, s_tok, s_src = _as_model(student, None)
    ids = (weights_hash(t_model), weights_hash(s_model))
    train_settings = {k: str(v) for k, v in train_kwargs.items()}
    inputs = train_kwargs.get("train_on_inputs")
    inputs = default_train_on_inputs(task) if inputs is None else bool(inputs)
    if inputs:  # named only when on, so results of runs without it (the earlier default) stay valid
        train_settings["train_on_inputs"] = "True"
    settings = {"teacher": ids[0], "student": ids[1], "limit": limit, "split": split, "apply_split": apply_split,
                "steps": steps, "train": train_settings,
                "eval": {k: str(v) for k, v in (eval_kwargs or {}).items() if k not in ("progress", "batch_size")}}
    # Runs of different model pairs never share a folder (a rebuilt pair gets new folders).
    root = root / f"pair-{ids[0][:8]}-{ids[1][:8]}"
    res_path = root / _task_folder(task) / "results.jsonl"
    done: dict[tuple, dict] = {}
    if res_path.is_file():
        for line in res_path.read_text().splitlines():
            r = json.loads(line)
            if r.pop("settings", None) == settings:
                done[_key(r)] = r
    rows: list[SweepRow] = []
    ev = {"limit": limit, "progress": False, **(eval_kwargs or {})}

    def record(row: SweepRow) -> SweepRow:
        rows.append(row)
        if _key(asdict(row)) not in done:
            done[_key(asdict(row))] = asdict(row)
            lines = [json.dumps({**r, "settings": settings}) for r in done.values()]
            atomic_write_text(res_path, "\n".join(lines) + "\n")
        return row

    def cached(**key) -> SweepRow | None:
        r = done.get(_key({"task": task, **key}))
        return SweepRow(**r) if r else None

    plan = [(rate, seed) for rate in transfer_rates for seed in seeds]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(plan) + 2 * baselines, desc=f"LaTen sweep {task}", unit="run")
    for name, (m, tok) in (("student", (s_model, s_tok)), ("teacher", (t_model, t_tok))) if baselines else ():
        row = cached(model=name)
        if row is None:
            r = evaluate((m, tok), task, split, **ev)
            row = SweepRow(task, name, r.score, r.n)
        record(row)
        if bar is not None:
            bar.update(1)
    apply_examples = load_task(task, apply_split)
    for rate, seed in plan:
        run_dir = root / _task_folder(task) / f"rate{rate:g}" / (f"seed{seed}" + ("-inputs" if inputs else ""))
        n_steps = steps or default_steps(task)
        for_steps = list(range(1, n_steps + 1)) if math.isclose(rate, main_rate) else [n_steps]
        todo = [st for st in for_steps if cached(model="laten", transfer_rate=rate, seed=seed, step=st) is None]
        if todo:
            train((t_model, t_tok), (s_model, s_tok), task, transfer_rate=rate, steps=n_steps, seed=seed,
                        out_dir=run_dir, cache_dir=root / "attributions", progress=False, **train_kwargs)
        for st in for_steps:
            row = cached(model="laten", transfer_rate=rate, seed=seed, step=st)
            if row is None:
                ex = apply_examples[seed % len(apply_examples)]
                applied = apply((t_model, t_tok), (s_model, s_tok), run_dir, step=st, task=task, example=ex,
                                out_dir=None, cache_dir=root / "attributions", progress=False)
                r = evaluate((applied.model, applied.tokenizer), task, split, **ev)
                ms = applied.record.meta["translated_rms"]
                row = SweepRow(task, "laten", r.score, r.n, rate, seed, st, ex.id,
                               float(math.sqrt(sum(v ** 2 for v in ms.values()) / max(1, len(ms)))),
                               sum(len(e["indices"]) for e in applied.record.entries), str(run_dir))
                del applied
            record(row)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return rows
