"""One training loop for everything pktlib trains: the pocket pair, LaTen's translator, Post-Align's LoRA.

A run is a sequence of optimiser steps ``0 .. steps-1`` (logged as steps ``1 .. steps``). Each step
(:func:`train_steps`):

1. sets every parameter group's learning rate to the schedule's value at that step;
2. calls the caller's step function, which computes the gradients and returns the step's
   statistics (a dict: one row of the log);
3. clips the gradient norm if asked, then takes the optimiser step;
4. calls the caller's ``after`` function, if any (LaTen measures the loss again after the step).

The learning rate is a pure function of the step number (:class:`Schedule`), so resuming needs
no scheduler state. Schedules are values of one argument, ``kind`` (:data:`SCHEDULES`):

* ``"cosine"``: linear warm-up over ``int(warmup * total)`` steps (at least one), then cosine
  decay to ``final * lr`` (the pocket pair's training stages);
* ``"one-cycle"``: the curve of ``torch.optim.lr_scheduler.OneCycleLR`` (:func:`one_cycle`; LaTen);
* ``"linear"``: linear warm-up over ``ceil(warmup * total)`` steps, then linear decay to 0
  (open-instruct's schedule; Post-Align);
* ``"constant"``.

Each keeps the warm-up rounding of the code it came from, so runs keep their numbers.

With a run folder (:class:`RunDir`) the loop appends one JSON line per step to ``log.jsonl`` and
saves a checkpoint folder ``checkpoint_<step>/`` (``train_state.pt``: optimiser and RNG states,
plus whatever the caller's :class:`Checkpointed` writes) where ``save_at`` says and after the last
step. Called again on the same folder with the same settings, it resumes after the last complete
checkpoint (log rows past it are dropped) and reproduces the uninterrupted run bit for bit.
"""
from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
from tqdm.auto import tqdm

from pktlib.errors import PktError
from pktlib.hooks import with_grad
from pktlib.records import atomic_dir, atomic_write_text, read_json, write_json

__all__ = ["SCHEDULES", "Schedule", "one_cycle", "Checkpointed", "RunDir", "TrainRun", "train_steps",
           "LOG_NAME", "STATE_NAME"]

LOG_NAME = "log.jsonl"
STATE_NAME = "train_state.pt"


# ======================================================================== schedules


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


def _cosine(step: int, total: int, lr: float, *, warmup: float = 0.05, final: float = 0.1) -> float:
    warm = max(1, int(warmup * total))
    if step < warm:
        return lr * (step + 1) / warm
    t = (step - warm) / max(1, total - warm)
    return lr * (final + (1 - final) * 0.5 * (1 + math.cos(math.pi * t)))


def _one_cycle(step: int, total: int, lr: float, *, warmup: float = 0.1, div: float = 25.0,
               final_div: float = 1.0) -> float:
    return lr * one_cycle(step, total, warmup, div, final_div)  # as LambdaLR: base_lr * multiplier


def _linear(step: int, total: int, lr: float, *, warmup: float = 0.03) -> float:
    n_warm = max(1, math.ceil(warmup * total))
    if step < n_warm:
        return lr * ((step + 1) / n_warm)
    return lr * max(0.0, (total - step) / max(1, total - n_warm))


def _constant(step: int, total: int, lr: float) -> float:
    return lr


# kind -> f(step, total, lr, **options) -> the learning rate of 0-based ``step``
SCHEDULES: dict[str, Callable[..., float]] = {"cosine": _cosine, "one-cycle": _one_cycle, "linear": _linear,
                                              "constant": _constant}


@dataclass(frozen=True)
class Schedule:
    """A learning-rate schedule: ``kind`` (see :data:`SCHEDULES`), peak ``lr``, its length, options.

    ``total`` is the number of steps the schedule spans; a run may stop earlier (LaTen trains
    ``steps`` of a schedule as long as its extract set). ``options`` are the kind's keywords
    (``warmup``: a share of ``total``; ``final``; ``div``, ``final_div``).
    """

    kind: str
    lr: float
    total: int
    options: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in SCHEDULES:
            raise PktError(f"unknown schedule {self.kind!r}; expected one of {', '.join(SCHEDULES)}")
        if self.total < 1:
            raise PktError(f"a schedule spans at least one step, got total={self.total}")

    def lr_at(self, step: int) -> float:
        """Learning rate of 0-based ``step``."""
        return SCHEDULES[self.kind](step, self.total, self.lr, **self.options)


# ======================================================================== run folders


@dataclass
class Checkpointed:
    """What a run saves into each checkpoint folder besides the optimiser and RNG states.

    ``save(folder)`` writes the trained weights (a translator, LoRA tensors) into ``folder``;
    ``load(folder)`` puts them back into the live objects when a run resumes.
    """

    save: Callable[[Path], None]
    load: Callable[[Path], None]


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


class RunDir:
    """A training run's folder: its settings file, ``log.jsonl`` and ``checkpoint_<step>/`` folders.

    ``settings`` (JSON-able, nested dicts allowed) are written to ``settings_name``; if the folder
    already holds a run, every setting must match except the dotted keys in ``free`` and the keys
    under them (those may change between calls, e.g. the number of steps), else a
    :class:`PktError` names the differences. ``defaults`` (dotted keys) stand in for settings the
    saved run predates (a setting added since counts as its default there).
    """

    def __init__(self, path: str | os.PathLike, settings: dict[str, Any], *, settings_name: str = "settings.json",
                 free: Iterable[str] = (), defaults: dict[str, Any] | None = None):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        file = self.path / settings_name
        now = json.loads(json.dumps(settings))  # as it will read back (tuples become lists)
        if file.is_file():
            saved = {**json.loads(json.dumps(defaults or {})), **_flat(read_json(file))}
            old, new, free = saved, _flat(now), tuple(free)
            diff = {k: (old.get(k), new.get(k)) for k in sorted(set(old) | set(new))
                    if old.get(k) != new.get(k) and not any(k == f or k.startswith(f + ".") for f in free)}
            if diff:
                raise PktError(f"{self.path} holds a run with other settings (saved, now): {diff}; "
                               "use another out_dir or delete it")
        write_json(file, now)

    # ----- checkpoints -------------------------------------------------------------------
    def checkpoint(self, step: int) -> Path:
        return self.path / f"checkpoint_{step}"

    def saved_steps(self) -> list[int]:
        """Steps with a complete checkpoint folder, ascending."""
        return saved_steps(self.path)

    def save(self, step: int, optimizer: torch.optim.Optimizer, what: Checkpointed | None = None, *,
             keep_last: int | None = None) -> Path:
        """Write ``checkpoint_<step>/`` whole (a temporary folder, then a rename); keep the last ``keep_last``."""
        final = self.checkpoint(step)
        with atomic_dir(final) as tmp:
            if what is not None:
                what.save(tmp)
            torch.save({"step": step, "optimizer": optimizer.state_dict(), "torch_rng": torch.get_rng_state(),
                        "python_rng": random.getstate()}, tmp / STATE_NAME)
        if keep_last is not None:
            for old in self.saved_steps()[:-keep_last]:
                shutil.rmtree(self.checkpoint(old), ignore_errors=True)
        return final

    def resume(self, optimizer: torch.optim.Optimizer, what: Checkpointed | None = None, *,
               max_step: int) -> int:
        """Restore the last checkpoint at or before ``max_step``; keep the log up to it. Returns its step (0: none)."""
        saved = [s for s in self.saved_steps() if s <= max_step]
        start = saved[-1] if saved else 0
        if start:
            ck = self.checkpoint(start)
            if what is not None:
                what.load(ck)
            state = torch.load(ck / STATE_NAME, weights_only=False)
            optimizer.load_state_dict(state["optimizer"])
            torch.set_rng_state(state["torch_rng"])
            random.setstate(state["python_rng"])
        # A crash between a log write and the next checkpoint leaves rows the resumed run writes again.
        kept = [r for r in self.read_log() if r["step"] <= start]
        atomic_write_text(self.path / LOG_NAME, "".join(json.dumps(r) + "\n" for r in kept))
        return start

    # ----- the log -----------------------------------------------------------------------
    def read_log(self) -> list[dict[str, Any]]:
        return read_log(self.path)

    def append_log(self, row: dict[str, Any]) -> None:
        with open(self.path / LOG_NAME, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(row) + "\n")
            fh.flush()


def saved_steps(path: str | os.PathLike) -> list[int]:
    """Steps of the complete ``checkpoint_<step>/`` folders in run folder ``path``, ascending."""
    steps = []
    for p in Path(path).glob("checkpoint_*"):
        tail = p.name[len("checkpoint_"):]
        if p.is_dir() and tail.isdigit() and (p / STATE_NAME).is_file():
            steps.append(int(tail))
    return sorted(steps)


def read_log(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The per-step rows of run folder ``path`` (``log.jsonl``); a line cut short by a crash is skipped."""
    p = Path(path) / LOG_NAME
    if not p.is_file():
        return []
    rows = []
    for line in p.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


# ======================================================================== the loop


@dataclass
class TrainRun:
    """What :func:`train_steps` did: the log of every step (resumed ones included)."""

    log: list[dict[str, Any]]
    resumed_from: int  # last step restored from a checkpoint when the call started (0: a fresh run)
    seconds: float


@with_grad  # a training loop differentiates, whatever the caller's grad mode
def train_steps(optimizer: torch.optim.Optimizer, step_fn: Callable[[int], dict[str, Any]], *, steps: int,
                schedule: Schedule, clip: tuple[Sequence[torch.Tensor], float] | None = None,
                after: Callable[[int, dict[str, Any]], None] | None = None, run: RunDir | None = None,
                checkpointed: Checkpointed | None = None, save_at: Callable[[int], bool] | None = None,
                keep_last: int | None = None, progress: str | None = None, postfix: Sequence[str] = (),
                on_step: Callable[[dict[str, Any]], None] | None = None) -> TrainRun:
    """Run optimiser steps ``0 .. steps-1`` (see the module docstring); returns the log.

    ``step_fn(i)`` computes the gradients of 0-based step ``i`` and returns its log row;
    ``after(i, row)`` may add to the row once the parameters moved. ``clip`` is
    ``(parameters, max_norm)``. With ``run`` the rows go to its ``log.jsonl``, the run resumes from
    its last checkpoint, and a checkpoint is saved after step ``s`` (1-based) when ``save_at(s)``
    (default: every step) and after the last step, keeping the last ``keep_last`` (default: all).
    ``progress`` names a progress bar (with the row's ``postfix`` keys); ``on_step(row)`` sees each row.
    Works inside ``torch.no_grad()`` (:func:`pktlib.hooks.with_grad`).
    """
    t0 = time.perf_counter()
    start = run.resume(optimizer, checkpointed, max_step=steps) if run is not None else 0
    log = run.read_log() if run is not None else []
    bar = tqdm(total=steps, initial=start, desc=progress, unit="step") if progress else None
    try:
        for i in range(start, steps):
            lr = schedule.lr_at(i)
            for g in optimizer.param_groups:
                g["lr"] = lr
            optimizer.zero_grad(set_to_none=True)
            row = {"step": i + 1, "lr": lr, **step_fn(i)}
            if clip is not None:
                torch.nn.utils.clip_grad_norm_(clip[0], clip[1])
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if after is not None:
                after(i, row)
            log.append(row)
            if run is not None:
                run.append_log(row)
                if i + 1 == steps or save_at is None or save_at(i + 1):
                    run.save(i + 1, optimizer, checkpointed, keep_last=keep_last)
            if on_step is not None:
                on_step(row)
            if bar is not None:
                bar.update(1)
                if postfix:
                    bar.set_postfix({k: f"{row[k]:.4g}" for k in postfix})
    finally:
        if bar is not None:
            bar.close()
    return TrainRun(log, start, time.perf_counter() - t0)
