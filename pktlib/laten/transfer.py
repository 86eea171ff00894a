"""LaTen inference: a trained translator applied for good, located on one unseen example (DESIGN.md 4.3).

The locate/inject settings come from the checkpoint (:func:`pktlib.laten.method.read_settings`);
the student is saved with ``changes.json``, the record of exactly which entries changed.
"""
from __future__ import annotations

import copy
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from pktlib.data import load_task
from pktlib.errors import PktError
from pktlib.data.examples import Example
from pktlib.hypernet import load_translator
from pktlib.injection import GQA_RULES, ChangeRecord, inject_, pair_deltas
from pktlib.laten.method import (APPLY_SETTINGS, check_locate_settings, check_pair, check_template, find_checkpoint,
                                 locate, read_settings)
from pktlib.models import resolve_model
from pktlib.records import atomic_dir, write_json
from pktlib.selection import layer_budget

__all__ = ["ApplyResult", "apply"]


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
    defaults = {"transfer_rate": 0.1, "normaliser": "rms", "attn_coefficient": "summed", "gqa_rule": "sum",
                "template": "default"}

    def same(a, b) -> bool:
        return a == b or (isinstance(a, float) and isinstance(b, float) and math.isclose(a, b))

    clash = {k: (stored[k], v) for k, v in given.items() if v is not None and k in stored and not same(v, stored[k])}
    if clash:
        detail = ", ".join(f"{k}={v!r} but the translator was trained with {k}={s!r}" for k, (s, v) in clash.items())
        raise PktError(f"{ck}: {detail}; leave these unset to use the translator's own settings")
    out = {k: (stored[k] if k in stored else given.get(k) if given.get(k) is not None else defaults[k])
           for k in APPLY_SETTINGS}
    check_locate_settings(out["normaliser"], out["attn_coefficient"])
    check_template(out["template"])
    if out["gqa_rule"] not in GQA_RULES:
        raise PktError(f"`gqa_rule` must be one of {GQA_RULES}, got {out['gqa_rule']!r}")
    return {**out, **{k: stored[k] for k in ("n_layers", "k_ffn", "k_attn") if k in stored}}


def apply(teacher: Any, student: Any, translator_dir: str | os.PathLike, *, task: str, split: str = "train",
          example_index: int = 0, transfer_rate: float | None = None, out_dir: str | os.PathLike | None,
          step: int | None = None, gqa_rule: str | None = None, normaliser: str | None = None,
          attn_coefficient: str | None = None, cache_dir: str | os.PathLike | None = None,
          device: str | None = None, inplace: bool = False, example: Example | None = None,
          template: str | None = None, progress: bool = True) -> ApplyResult:
    """Transfer with a trained translator: locate one unseen example, translate, inject for good.

    ``translator_dir`` is a checkpoint folder or a run folder (then ``step``, default the last
    checkpoint). The example is ``load_task(task, split)[example_index]`` unless ``example`` is
    given. Saves the injected student (HF format, with its tokenizer) and ``changes.json``
    into ``out_dir`` (``None``: nothing saved). A loaded student is copied first unless
    ``inplace``. ``transfer_rate``, ``gqa_rule``, ``normaliser`` and ``attn_coefficient`` come
    from the checkpoint's stored settings (:func:`read_settings`); passing one that differs
    from them raises :class:`PktError` (for an old checkpoint without settings, the given
    values or the defaults 0.1 / "sum" / "rms" / "summed" are used); so does ``template``, the
    prompt format of the attributed example (default "default").
    """
    ck = find_checkpoint(translator_dir, step)
    how = _apply_settings(ck, {"transfer_rate": transfer_rate, "normaliser": normaliser,
                               "attn_coefficient": attn_coefficient, "gqa_rule": gqa_rule, "template": template})
    transfer_rate, gqa_rule = how["transfer_rate"], how["gqa_rule"]
    t_model, t_tok, t_src = resolve_model(teacher, device=device, need_tokenizer=True)
    s_model, s_tok, s_src = resolve_model(student, device=device or next(t_model.parameters()).device,
                                          need_tokenizer=True)
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
    bar = tqdm(total=3, desc="LaTen apply", unit="stage") if progress else None
    t0 = time.perf_counter()
    budget = layer_budget(ts, ss, transfer_rate)
    if "n_layers" in how and budget != (how["n_layers"], how["k_ffn"], how["k_attn"]):
        raise PktError(f"{ck} was trained with (layers, FFN k, attention k) = "
                       f"{(how['n_layers'], how['k_ffn'], how['k_attn'])}, but this pair gives {budget}")
    located = locate(t_model, t_tok, s_model, s_tok, example, transfer_rate=transfer_rate,
                     normaliser=how["normaliser"], attn_coefficient=how["attn_coefficient"], cache_dir=cache_dir,
                     modules=c.modules, template=how["template"])
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
        "attn_coefficient": how["attn_coefficient"], "template": how["template"], "translator": str(ck), "teacher": t_src, "student": s_src,
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
