"""Post-Align PKT: LoRA initialisations (random, PiSSA, Seeking) and fine-tuning (DESIGN.md 4.5).

The paper's Post-Align paradigm initialises the student's LoRA modules from the teacher's
parameters and then fine-tunes them; the question is whether the teacher's parameters help
compared with PiSSA (the student's own principal components) and peft's default random
initialisation. Every initialisation uses peft's own LoRA classes and leaves the model's
outputs unchanged at step 0:

* ``random``: peft's default (``A`` Kaiming-uniform, ``B = 0``);
* ``pissa``: peft's ``init_lora_weights="pissa"`` (Meng et al. 2024): ``B A`` = the top-r
  singular part of the student's own weight, the base weight keeps the residual;
* ``seeking``: Seeking (Zhong et al. 2023): the teacher matrix cut out by sensitivity
  (:func:`pktlib.seeking.seeking_extract`), factorised by SVD, ``B = U_r S_r``,
  ``A = V_r^T``; the base weight becomes ``W - scale * B A`` (``scale = alpha / r``).

:func:`finetune` trains the LoRA parameters with the paper's Table 4 settings per task family
(AdamW, batch 64 by gradient accumulation) in the loop of :mod:`pktlib.training`, writing a
JSON-lines log and resumable checkpoints.
"""
from __future__ import annotations

import copy
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file
from torch import nn

from pktlib.data import collate, load_task, prompt_answer_pairs, task_info, tokenize_example
from pktlib.errors import PktError
from pktlib.models import MODULES, TRANSFERRED_MODULES, check_pair, load_tokenizer, resolve_model, spec
from pktlib.records import write_json
from pktlib.seeking import SeekingExtract, Sensitivity, as_examples, seeking_extract, sensitivity, svd_factors
from pktlib.training import Checkpointed, RunDir, Schedule, train_steps

__all__ = [
    "LORA_INITS",
    "TABLE4",
    "lora_model",
    "seeking_lora_factors",
    "finetune_defaults",
    "FinetuneResult",
    "finetune",
    "merged_copy",
]

# Paper Table 4: (learning rate, epochs) by task; batch size 64 throughout.
TABLE4: dict[str, tuple[float, int]] = {
    "knowledge": (3e-4, 5),  # MMLU
    "math": (3e-4, 5),  # GSM8K
    "humaneval": (3e-5, 3),
    "code": (3e-4, 5),  # MBPP (and other code tasks, e.g. pocket-code)
}


# --------------------------------------------------------------------- initialisations
# name -> (peft's init_lora_weights value, post-processing after get_peft_model or None)
LORA_INITS: dict[str, tuple[Any, Callable[..., dict[str, Any]] | None]] = {}


def _register_init(name: str, peft_value: Any):
    def deco(fn):
        LORA_INITS[name] = (peft_value, fn)
        return fn

    return deco


LORA_INITS["random"] = (True, None)
LORA_INITS["pissa"] = ("pissa", None)


def seeking_lora_factors(mat: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B (out, r), A (r, in))`` with ``B A`` the rank-r SVD truncation of ``mat``.

    Zero-padded to exactly ``r`` columns/rows when ``mat`` has lower rank than ``r``.
    """
    B, A = svd_factors(mat, r)
    k = B.shape[1]
    if k < r:
        B = torch.cat([B, B.new_zeros(B.shape[0], r - k)], 1)
        A = torch.cat([A, A.new_zeros(r - k, A.shape[1])], 0)
    return B, A


@_register_init("seeking", True)
def _seeking_init(peft_model, *, teacher, pairs, modules: Sequence[str], r: int, progress: bool,
                  adapter: str = "default") -> dict[str, Any]:
    """Overwrite peft's random A/B by Seeking's factors and subtract ``scale * B A`` from the base."""
    base = peft_model.get_base_model()
    if isinstance(pairs, SeekingExtract):  # extracted once by the caller (no teacher needed here)
        ex = pairs
        missing = sorted({m for m in modules} - {m for _, m in ex.matrices})
        if missing:
            raise PktError(f"the given Seeking extract has no matrices for modules {missing}")
    else:
        if teacher is None or pairs is None:
            raise PktError("init='seeking' needs teacher= and pairs= (extract examples)")
        t_model, t_tok, _ = resolve_model(teacher)
        check_pair(t_model, base, method="a Seeking initialisation", larger=(), same=("vocab_size",))
        examples = as_examples(pairs)
        if isinstance(examples, Sensitivity):
            sens = examples
        else:
            if t_tok is None:
                raise PktError("init='seeking' needs the teacher's tokenizer: pass (model, tokenizer) or a model directory")
            sens = sensitivity(t_model, t_tok, examples, modules=tuple(modules), progress=progress)
        # peft's LoRA layers expose their base layer's ``.weight``, so the spec reads the shapes.
        ex = seeking_extract(t_model, sens, base, modules=modules, progress=progress)
    ss = spec(base)
    with torch.no_grad():
        for (j, m), mat in ex.matrices.items():
            layer = ss.module(base, j, m)
            B, A = seeking_lora_factors(mat, r)
            layer.lora_A[adapter].weight.copy_(A.to(layer.lora_A[adapter].weight))
            layer.lora_B[adapter].weight.copy_(B.to(layer.lora_B[adapter].weight))
            scale = layer.scaling[adapter]
            w = layer.get_base_layer().weight
            w.sub_((scale * (B @ A)).to(w))
    return ex.to_record()


def lora_model(student: Any, *, init: str = "random", teacher: Any = None, pairs: Any = None, r: int = 16,
               alpha: int = 16, dropout: float = 0.05, modules: Sequence[str] = TRANSFERRED_MODULES, seed: int = 0,
               progress: bool = True):
    """The student wrapped in peft LoRA modules, initialised by ``init``.

    ``student``: a model (wrapped in place, as peft does), a ``(model, tokenizer)`` pair or a
    model path. ``init``: "random" | "pissa" | "seeking" (the latter needs ``teacher`` and
    ``pairs``: extract examples, (prompt, answer) pairs, a task name or a precomputed teacher
    :class:`~pktlib.seeking.Sensitivity`; or only ``pairs``, a precomputed
    :class:`~pktlib.seeking.SeekingExtract` for this student, when the teacher need not stay in
    memory). The result's outputs equal the student's at initialisation for every ``init``.
    ``peft_model.pkt_init`` records what was done.
    """
    if init not in LORA_INITS:
        raise PktError(f"unknown LoRA init {init!r}; expected one of {', '.join(LORA_INITS)}")
    if r <= 0:
        raise PktError(f"LoRA rank r must be positive, got {r}")
    model, tok, source = resolve_model(student)
    s = spec(model)
    bad = [m for m in modules if m not in MODULES]
    if bad:
        raise PktError(f"unknown LoRA target modules {bad}; expected some of {sorted(MODULES)}")
    peft_value, post = LORA_INITS[init]
    # Target exactly the decoder layers' modules, by full path (never the lm_head etc.).
    targets = [s.module_path(l, m) for l in range(s.n_layers) for m in modules]
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets,
                        init_lora_weights=peft_value, bias="none", task_type="CAUSAL_LM")
    torch.manual_seed(seed)  # peft's random A
    peft_model = get_peft_model(model, config)
    info: dict[str, Any] = {"init": init, "r": r, "alpha": alpha, "dropout": dropout, "modules": list(modules),
                            "seed": seed, "student": source}
    if post is not None:
        info["seeking"] = post(peft_model, teacher=teacher, pairs=pairs, modules=modules, r=r, progress=progress)
    peft_model.pkt_init = info
    if tok is not None:
        peft_model.pkt_tokenizer = tok
    return peft_model


# ------------------------------------------------------------------------------ training
def finetune_defaults(task: str) -> tuple[float, int]:
    """Paper Table 4 ``(lr, epochs)`` for ``task`` (by name for HumanEval, else by family)."""
    info = task_info(task)
    key = "humaneval" if info.name == "humaneval" else info.family
    if key not in TABLE4:
        return TABLE4["knowledge"]  # custom tasks: the common setting (3e-4, 5 epochs)
    return TABLE4[key]


@dataclass
class FinetuneResult:
    out_dir: str
    task: str
    split: str
    n_examples: int
    lr: float
    epochs: int
    batch_size: int
    micro_batch: int
    steps: int
    seed: int
    final_loss: float | None
    wall_s: float
    resumed_from: int = 0
    log: list[dict[str, Any]] = field(default_factory=list)

    def curve(self) -> list[tuple[int, float]]:
        return [(r["step"], r["loss"]) for r in self.log]


def _tokenizer_of(peft_model, tokenizer):
    if tokenizer is not None:
        return tokenizer
    tok = getattr(peft_model, "pkt_tokenizer", None)
    if tok is not None:
        return tok
    src = getattr(peft_model.get_base_model().config, "_name_or_path", "")
    if src and Path(src).exists():
        return load_tokenizer(src)
    raise PktError("finetune needs the student's tokenizer: pass tokenizer=")


def _trainable(peft_model) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in peft_model.named_parameters() if p.requires_grad}


def _lora_checkpoint(params: dict[str, torch.nn.Parameter]) -> Checkpointed:
    """LoRA tensors in ``lora.safetensors`` of each checkpoint folder."""
    def save(folder: Path) -> None:
        save_file({k: p.detach().cpu().contiguous() for k, p in params.items()}, str(folder / "lora.safetensors"))

    def load(folder: Path) -> None:
        saved = load_file(str(folder / "lora.safetensors"))
        with torch.no_grad():
            for k, p in params.items():
                p.copy_(saved[k])

    return Checkpointed(save, load)


def finetune(peft_model, task: str, *, split: str = "train", n: int | None = None, lr: float | None = None,
             epochs: int | None = None, batch_size: int = 64, micro_batch: int = 8, seed: int = 0,
             out_dir: str | os.PathLike, tokenizer=None, max_length: int | None = 512, save_every: int | None = None,
             template: str = "default", progress: bool = True) -> FinetuneResult:
    """Fine-tune the LoRA parameters of ``peft_model`` on ``task``/``split`` (paper Table 4 defaults).

    ``n`` takes the first ``n`` examples of the split (None: all). ``lr``/``epochs`` default
    per task (:func:`finetune_defaults`). Each optimiser step sees ``batch_size`` examples
    in micro-batches of ``micro_batch`` (gradient accumulation; the loss is the mean over
    all answer tokens of the batch, prompts masked). AdamW (no weight decay), 3% linear
    warm-up then linear decay (``Schedule("linear")``). ``out_dir`` is a run folder of
    :mod:`pktlib.training`: ``settings.json``, ``log.jsonl`` (one line per step), the last
    ``checkpoint_<step>/`` (LoRA weights, optimiser; saved every ``save_every`` steps and at
    each epoch's end) and ``result.json``. Calling again with the same settings resumes from
    the checkpoint (recreate the model with the same ``lora_model`` arguments first). Works
    inside ``torch.no_grad()`` (the loop enables gradients: :func:`pktlib.hooks.with_grad`).
    ``template``: the prompt format (:func:`pktlib.data.format_prompt`: "default", the original
    code's; "chat" or "auto" for a chat model's own template, as its evaluation prompts use).
    """
    t0 = time.perf_counter()
    out = Path(out_dir)
    d_lr, d_epochs = finetune_defaults(task)
    lr = float(lr if lr is not None else d_lr)
    epochs = int(epochs if epochs is not None else d_epochs)
    if batch_size <= 0 or micro_batch <= 0:
        raise PktError(f"batch_size and micro_batch must be positive, got {batch_size} and {micro_batch}")
    micro_batch = min(micro_batch, batch_size)
    tok = _tokenizer_of(peft_model, tokenizer)
    examples = load_task(task, split)
    if n is not None:
        if n <= 0:
            raise PktError(f"n must be positive, got {n}")
        examples = examples[:n]
    items = [tokenize_example(tok, pa, max_length=max_length)
             for pa in prompt_answer_pairs(examples, tokenizer=tok, template=template)]
    items = [it for it in items if any(t != -100 for t in it["labels"])]
    if not items:
        raise PktError(f"task {task!r} split {split!r}: no example has an answer token to train on")
    N = len(items)
    steps_per_epoch = math.ceil(N / batch_size)
    total = steps_per_epoch * epochs
    params = _trainable(peft_model)
    if not params:
        raise PktError("the model has no trainable parameters: pass a LoRA model from lora_model()")
    run = RunDir(out, {"task": task, "split": split, "n": N, "lr": lr, "epochs": epochs, "batch_size": batch_size,
                       "seed": seed, "max_length": max_length, "template": template},
                 defaults={"template": "default"})
    opt = torch.optim.AdamW(params.values(), lr=lr, weight_decay=0.0)
    device = next(peft_model.parameters()).device
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    def step(i: int) -> dict[str, Any]:
        epoch, k = divmod(i, steps_per_epoch)
        g = torch.Generator().manual_seed(seed * 100_003 + epoch)  # one fixed order per epoch
        batch_ids = torch.randperm(N, generator=g).tolist()[k * batch_size:(k + 1) * batch_size]
        n_tok = sum(sum(t != -100 for t in items[j]["labels"][1:]) for j in batch_ids)
        torch.manual_seed(seed * 1_000_003 + i)  # dropout masks, reproducible on resume
        loss_sum = 0.0
        for s0 in range(0, len(batch_ids), micro_batch):
            mb = collate([items[j] for j in batch_ids[s0:s0 + micro_batch]], pad).to(device)
            logits = peft_model(input_ids=mb.input_ids, attention_mask=mb.attention_mask).logits
            # Sum of token losses / tokens of the whole batch = the full batch's mean loss.
            loss = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                               mb.labels[:, 1:].reshape(-1), ignore_index=-100,
                                               reduction="sum") / n_tok
            loss.backward()
            loss_sum += float(loss.detach())
        return {"epoch": epoch + (k + 1) / steps_per_epoch, "loss": loss_sum, "tokens": n_tok}

    def after(i: int, row: dict[str, Any]) -> None:
        row["time_s"] = round(time.perf_counter() - t0, 3)

    was_training = peft_model.training
    peft_model.train()
    try:
        done = train_steps(opt, step, steps=total, schedule=Schedule("linear", lr, total, {"warmup": 0.03}),
                           after=after, run=run, checkpointed=_lora_checkpoint(params), keep_last=1,
                           save_at=lambda s: s % steps_per_epoch == 0 or bool(save_every and s % save_every == 0),
                           progress=f"fine-tune {task}" if progress else None, postfix=("loss", "epoch"))
    finally:
        peft_model.train(was_training)
    log = done.log
    res = FinetuneResult(str(out), task, split, N, lr, epochs, batch_size, micro_batch, total, seed,
                         log[-1]["loss"] if log else None, round(time.perf_counter() - t0, 2), done.resumed_from, log)
    write_json(out / "result.json", {k: v for k, v in asdict(res).items() if k != "log"}
               | {"init": getattr(peft_model, "pkt_init", None)})
    return res


def merged_copy(peft_model) -> nn.Module:
    """A plain model with the LoRA product merged into the weights (the peft model is untouched)."""
    return copy.deepcopy(peft_model).merge_and_unload()
