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
  (:func:`pktlib.extraction.seeking_extract`), factorised by SVD, ``B = U_r S_r``,
  ``A = V_r^T``; the base weight becomes ``W - scale * B A`` (``scale = alpha / r``).

:func:`finetune` trains the LoRA parameters with the paper's Table 4 settings per task family
(AdamW, batch 64 by gradient accumulation), writing a JSON-lines log and resumable checkpoints.
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from pktlib.errors import PktError
from pktlib.hooks import with_grad
from pktlib.models import spec

__all__ = [
    "LORA_INITS",
    "LORA_MODULES",
    "TABLE4",
    "lora_model",
    "seeking_lora_factors",
    "finetune_defaults",
    "FinetuneResult",
    "finetune",
]

LORA_MODULES: tuple[str, ...] = ("up_proj", "down_proj", "v_proj", "o_proj")

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
    from pktlib.extraction import svd_factors

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
    from pktlib.baselines import as_examples, resolve_model
    from pktlib.extraction import Sensitivity, seeking_extract, sensitivity

    if teacher is None or pairs is None:
        raise PktError("init='seeking' needs teacher= and pairs= (extract examples)")
    t_model, t_tok, _ = resolve_model(teacher)
    base = peft_model.get_base_model()
    ss, ts = spec(base), spec(t_model)
    if ts.vocab_size != ss.vocab_size:
        raise PktError(f"teacher and student vocabularies differ ({ts.vocab_size} vs {ss.vocab_size} tokens)")
    examples = as_examples(pairs)
    if isinstance(examples, Sensitivity):
        sens = examples
    else:
        if t_tok is None:
            raise PktError("init='seeking' needs the teacher's tokenizer: pass (model, tokenizer) or a model directory")
        sens = sensitivity(t_model, t_tok, examples, modules=tuple(modules), progress=progress)
    # peft's LoRA layers expose their base layer's ``.weight``, so the spec reads the shapes.
    ex = seeking_extract(t_model, sens, base, modules=modules, progress=progress)
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
               alpha: int = 16, dropout: float = 0.05, modules: Sequence[str] = LORA_MODULES, seed: int = 0,
               progress: bool = True):
    """The student wrapped in peft LoRA modules, initialised by ``init``.

    ``student``: a model (wrapped in place, as peft does), a ``(model, tokenizer)`` pair or a
    model path. ``init``: "random" | "pissa" | "seeking" (the latter needs ``teacher`` and
    ``pairs``: extract examples, (prompt, answer) pairs, a task name or a precomputed teacher
    :class:`~pktlib.extraction.Sensitivity`). The result's outputs equal the student's at
    initialisation for every ``init``. ``peft_model.pkt_init`` records what was done.
    """
    from peft import LoraConfig, get_peft_model

    from pktlib.baselines import resolve_model

    if init not in LORA_INITS:
        raise PktError(f"unknown LoRA init {init!r}; expected one of {', '.join(LORA_INITS)}")
    if r <= 0:
        raise PktError(f"LoRA rank r must be positive, got {r}")
    model, tok, source = resolve_model(student)
    s = spec(model)
    bad = [m for m in modules if m not in ("up_proj", "gate_proj", "down_proj", "q_proj", "k_proj", "v_proj", "o_proj")]
    if bad:
        raise PktError(f"unknown LoRA target modules {bad}")
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
    from pktlib.data import task_info

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


def _lr_lambda(total: int, warmup: float = 0.03) -> Callable[[int], float]:
    """Linear warm-up over ``warmup`` of the steps, then linear decay to 0 (open-instruct's schedule)."""
    n_warm = max(1, math.ceil(warmup * total))

    def f(step: int) -> float:
        if step < n_warm:
            return (step + 1) / n_warm
        return max(0.0, (total - step) / max(1, total - n_warm))

    return f


def _tokenizer_of(peft_model, tokenizer):
    if tokenizer is not None:
        return tokenizer
    tok = getattr(peft_model, "pkt_tokenizer", None)
    if tok is not None:
        return tok
    src = getattr(peft_model.get_base_model().config, "_name_or_path", "")
    if src and Path(src).exists():
        from pktlib.models import load_tokenizer

        return load_tokenizer(src)
    raise PktError("finetune needs the student's tokenizer: pass tokenizer=")


def _save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    from pktlib.records import atomic_path

    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def _trainable(peft_model) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in peft_model.named_parameters() if p.requires_grad}


@with_grad
def finetune(peft_model, task: str, *, split: str = "train", n: int | None = None, lr: float | None = None,
             epochs: int | None = None, batch_size: int = 64, micro_batch: int = 8, seed: int = 0,
             out_dir: str | os.PathLike, tokenizer=None, max_length: int | None = 512, save_every: int | None = None,
             progress: bool = True) -> FinetuneResult:
    """Fine-tune the LoRA parameters of ``peft_model`` on ``task``/``split`` (paper Table 4 defaults).

    ``n`` takes the first ``n`` examples of the split (None: all). ``lr``/``epochs`` default
    per task (:func:`finetune_defaults`). Each optimiser step sees ``batch_size`` examples
    in micro-batches of ``micro_batch`` (gradient accumulation; the loss is the mean over
    all answer tokens of the batch, prompts masked). AdamW (no weight decay), 3% linear
    warm-up then linear decay. ``out_dir`` receives ``log.jsonl`` (one line per step),
    ``checkpoint.pt`` (LoRA weights, optimiser, schedule; every ``save_every`` steps and at
    each epoch's end) and ``result.json``. Works inside ``torch.no_grad()``
    (:func:`pktlib.hooks.with_grad`). Calling again with the same settings resumes
    from the checkpoint (recreate the model with the same ``lora_model`` arguments first).
    """
    from pktlib.data import collate, load_task, tokenize_example
    from pktlib.records import atomic_write_text, write_json

    t0 = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
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
    items = [tokenize_example(tok, ex, max_length=max_length) for ex in examples]
    items = [it for it in items if any(t != -100 for t in it["labels"])]
    if not items:
        raise PktError(f"task {task!r} split {split!r}: no example has an answer token to train on")
    N = len(items)
    steps_per_epoch = math.ceil(N / batch_size)
    total = steps_per_epoch * epochs
    settings = {"task": task, "split": split, "n": N, "lr": lr, "epochs": epochs, "batch_size": batch_size,
                "seed": seed, "max_length": max_length}

    params = _trainable(peft_model)
    if not params:
        raise PktError("the model has no trainable parameters: pass a LoRA model from lora_model()")
    opt = torch.optim.AdamW(params.values(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(total))
    ckpt = out / "checkpoint.pt"
    log_path = out / "log.jsonl"
    step, log = 0, []
    if ckpt.is_file():
        state = torch.load(ckpt, map_location="cpu", weights_only=False)
        if state["settings"] != settings:
            diff = {k: (state["settings"].get(k), v) for k, v in settings.items() if state["settings"].get(k) != v}
            raise PktError(f"{ckpt} was written with other settings {diff}; use another out_dir or delete it")
        with torch.no_grad():
            for k, p in params.items():
                p.copy_(state["params"][k])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        step = int(state["step"])
    if log_path.is_file():  # keep only what the checkpoint covers
        log = [json.loads(l) for l in log_path.read_text(encoding="utf-8").splitlines() if l.strip()]
        log = [r for r in log if r["step"] <= step]
        atomic_write_text(log_path, "".join(json.dumps(r) + "\n" for r in log))
    resumed_from = step

    def save() -> None:
        _save_checkpoint(ckpt, {"settings": settings, "step": step,
                                "params": {k: p.detach().cpu().clone() for k, p in params.items()},
                                "optimizer": opt.state_dict(), "scheduler": sched.state_dict()})

    device = next(peft_model.parameters()).device
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    was_training = peft_model.training
    peft_model.train()
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, initial=step, desc=f"fine-tune {task}", unit="step")
    try:
        with open(log_path, "a", encoding="utf-8") as logf:
            while step < total:
                epoch, k = divmod(step, steps_per_epoch)
                g = torch.Generator().manual_seed(seed * 100_003 + epoch)  # one fixed order per epoch
                order = torch.randperm(N, generator=g).tolist()
                batch_ids = order[k * batch_size:(k + 1) * batch_size]
                n_tok = sum(sum(t != -100 for t in items[i]["labels"][1:]) for i in batch_ids)
                torch.manual_seed(seed * 1_000_003 + step)  # dropout masks, reproducible on resume
                opt.zero_grad(set_to_none=True)
                loss_sum = 0.0
                for s0 in range(0, len(batch_ids), micro_batch):
                    mb = collate([items[i] for i in batch_ids[s0:s0 + micro_batch]], pad).to(device)
                    logits = peft_model(input_ids=mb.input_ids, attention_mask=mb.attention_mask).logits
                    # Sum of token losses / tokens of the whole batch = the full batch's mean loss.
                    loss = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                                       mb.labels[:, 1:].reshape(-1), ignore_index=-100,
                                                       reduction="sum") / n_tok
                    loss.backward()
                    loss_sum += float(loss.detach())
                opt.step()
                sched.step()
                step += 1
                rec = {"step": step, "epoch": epoch + (k + 1) / steps_per_epoch, "loss": loss_sum,
                       "lr": opt.param_groups[0]["lr"], "tokens": n_tok, "time_s": round(time.perf_counter() - t0, 3)}
                log.append(rec)
                logf.write(json.dumps(rec) + "\n")
                logf.flush()
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss_sum:.3f}", epoch=f"{rec['epoch']:.2f}")
                if step % steps_per_epoch == 0 or (save_every and step % save_every == 0) or step == total:
                    save()
    finally:
        if bar is not None:
            bar.close()
        peft_model.train(was_training)
    res = FinetuneResult(str(out), task, split, N, lr, epochs, batch_size, micro_batch, total, seed,
                         log[-1]["loss"] if log else None, round(time.perf_counter() - t0, 2), resumed_from, log)
    write_json(out / "result.json", {k: v for k, v in asdict(res).items() if k != "log"}
               | {"init": getattr(peft_model, "pkt_init", None)})
    return res


def merged_copy(peft_model) -> nn.Module:
    """A plain model with the LoRA product merged into the weights (the peft model is untouched)."""
    import copy

    return copy.deepcopy(peft_model).merge_and_unload()
