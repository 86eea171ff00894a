"""Training the pocket pair: models, batches, the two training stages, and the build of the four checkpoints.

No weights can be downloaded on the machines this project runs on, so pktlib ships its own
cross-scale pair (DESIGN.md section 3): two Llama-architecture decoders, a deeper and wider
*teacher* and a *student*, each as a ``base`` checkpoint (trained on a plain corpus) and a
``chat`` checkpoint (the base fine-tuned on prompt/answer pairs), like Llama-2-13B/7B and
their chat versions. Everything is generated (:mod:`pktlib.data.suite`) and trained from seeds with
the one training loop of :mod:`pktlib.training`: nothing is downloaded.
"""
from __future__ import annotations

import contextlib
import math
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from pktlib.cache import locked
from pktlib.data import collate, format_prompt, tokenize_example
from pktlib.errors import PktError
from pktlib.data.examples import Example
from pktlib.models import spec
from pktlib.records import write_json
from pktlib.data.suite import base_corpus, chat_examples
from pktlib.training import Checkpointed, RunDir, Schedule, train_steps
from pktlib.zoo.cards import read_card, save_checkpoint
from pktlib.zoo.config import (CHECKPOINTS, ModelConfig, PairConfig, PocketPair, TrainConfig, for_this_machine,
                               get_preset, pair_dir)
from pktlib.zoo.tokenizer import train_tokenizer

__all__ = ["build_model", "TrainLog", "train_stage", "base_batches", "chat_batches", "with_replay", "train_base",
           "train_chat", "build_pair", "pocket_pair"]


def build_model(cfg: ModelConfig, tokenizer, *, seed: int, max_positions: int = 512):
    """A freshly initialised ``LlamaForCausalLM`` (float32) of shape ``cfg``."""
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=cfg.hidden_size,
                         intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.n_layers,
                         num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_heads, head_dim=cfg.head_dim,
                         max_position_embeddings=max_positions, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         tie_word_embeddings=False, rms_norm_eps=1e-5)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).float()


@dataclass
class TrainLog:
    """What a training stage did: the card's training section."""

    steps: int = 0
    tokens: int = 0  # tokens in the batches (answer tokens for chat are counted in `loss_tokens`)
    loss_tokens: int = 0
    seconds: float = 0.0
    loss_curve: list[tuple[int, float]] = field(default_factory=list)  # (step, mean loss since last record)


def _autocast(dtype: str | None) -> contextlib.AbstractContextManager:
    """Autocast on the CPU, where the pocket pair trains; a null context for ``None``."""
    if dtype is None:
        return contextlib.nullcontext()
    if not isinstance(getattr(torch, dtype, None), torch.dtype):
        raise PktError(f"ModelConfig.autocast={dtype!r} is not a torch dtype (e.g. 'bfloat16')")
    return torch.autocast("cpu", dtype=getattr(torch, dtype))


def train_stage(model, batches: list[dict[str, torch.Tensor]], cfg: TrainConfig, *, seed: int,
                autocast: str | None = None, progress: Callable[[int], None] | None = None,
                run_dir: Path | None = None, save_every: int = 200) -> TrainLog:
    """AdamW over ``batches`` in the given order: warm-up then cosine decay to 10% of ``cfg.lr``
    (``Schedule("cosine")``), gradients clipped to norm 1, weight decay on matrices only.

    ``autocast``: the dtype of the forward's matmuls (:attr:`ModelConfig.autocast`), or None.
    ``progress(n)`` is told the tokens of each step. With ``run_dir`` the stage checkpoints every
    ``save_every`` steps (only the last kept) and a call on the same folder resumes from there,
    to the weights an uninterrupted stage ends with (:mod:`pktlib.training`).
    """
    torch.manual_seed(seed)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8)
    amp = _autocast(autocast)  # checked once; the context is re-entered every step
    model.train()

    def step(i: int) -> dict[str, Any]:
        b = batches[i]
        with amp:
            out = model(input_ids=b["input_ids"], attention_mask=b.get("attention_mask"), labels=b["labels"])
        loss = out.loss.float()
        if not torch.isfinite(loss):
            raise PktError(f"training diverged: loss {loss.item()} at step {i} (lr {cfg.lr})")
        loss.backward()
        return {"loss": loss.item(), "tokens": int(b["input_ids"].numel()),
                "loss_tokens": int((b["labels"][:, 1:] != -100).sum())}

    run_folder, weights = None, None
    if run_dir is not None:
        run_folder = RunDir(run_dir, {"train": asdict(cfg), "seed": seed, "autocast": autocast, "steps": len(batches),
                                      "parameters": sum(p.numel() for p in model.parameters())})
        weights = Checkpointed(save=lambda d: save_file(model.state_dict(), str(d / "model.safetensors")),
                               load=lambda d: model.load_state_dict(load_file(str(d / "model.safetensors"))))
    run = train_steps(opt, step, steps=len(batches),
                      schedule=Schedule("cosine", cfg.lr, len(batches), {"warmup": cfg.warmup, "final": 0.1}),
                      clip=(list(model.parameters()), 1.0), run=run_folder, checkpointed=weights,
                      save_at=lambda s: s % save_every == 0, keep_last=1,
                      on_step=(lambda row: progress(row["tokens"])) if progress else None)
    if progress and run.resumed_from:  # the steps restored from a checkpoint count too
        progress(sum(r["tokens"] for r in run.log[:run.resumed_from]))
    model.eval()
    log = TrainLog(steps=len(run.log), tokens=sum(r["tokens"] for r in run.log),
                   loss_tokens=sum(r["loss_tokens"] for r in run.log), seconds=run.seconds)
    acc, acc_n = 0.0, 0
    for r in run.log:  # the mean loss over every `log_every` steps (and the last, shorter stretch)
        acc, acc_n = acc + r["loss"], acc_n + 1
        if r["step"] % cfg.log_every == 0 or r["step"] == len(batches):
            log.loss_curve.append((r["step"], round(acc / acc_n, 5)))
            acc, acc_n = 0.0, 0
    return log


def base_batches(tokenizer, docs: Sequence[str], cfg: PairConfig, *, seed: int) -> list[dict[str, torch.Tensor]]:
    """The base corpus shuffled (by ``seed``), packed into ``seq_len`` blocks: ``<s> doc </s> <s> doc ...``."""
    rng = random.Random(f"order-{seed}")
    docs = list(docs)
    rng.shuffle(docs)
    docs = docs[: max(1, int(len(docs) * cfg.corpus_share))]
    ids = tokenizer(docs, add_special_tokens=True)["input_ids"]
    stream = [t for seq in ids for t in (*seq, tokenizer.eos_token_id)]
    n_blocks = len(stream) // cfg.seq_len
    blocks = torch.tensor(stream[: n_blocks * cfg.seq_len]).view(n_blocks, cfg.seq_len)  # (N, T)
    n_batches = max(1, int(n_blocks * cfg.base.epochs) // cfg.base.batch_size)
    order = torch.randperm(n_blocks, generator=torch.Generator().manual_seed(seed))
    out = []
    for i in range(n_batches):
        idx = order[torch.arange(i * cfg.base.batch_size, (i + 1) * cfg.base.batch_size) % n_blocks]
        x = blocks[idx]  # (B, T)
        out.append({"input_ids": x, "labels": x.clone()})
    return out


def chat_batches(tokenizer, examples: Sequence[Example], cfg: PairConfig, *, seed: int) -> list[dict[str, torch.Tensor]]:
    """Prompt/answer pairs in the default chat format, loss on the answers, shuffled by ``seed``.

    Epoch after epoch of fresh permutations; only the examples used are tokenised (the tiny
    preset uses a few dozen of the 3,000).
    """
    n = len(examples)
    n_batches = max(1, int(n * cfg.chat.epochs) // cfg.chat.batch_size)
    g = torch.Generator().manual_seed(seed + 1)
    order = torch.cat([torch.randperm(n, generator=g) for _ in range(math.ceil(cfg.chat.epochs) + 1)]).tolist()
    cache: dict[int, dict[str, Any] | None] = {}

    def item(j: int) -> dict[str, Any] | None:
        if j not in cache:
            it = tokenize_example(tokenizer, examples[j], max_length=cfg.seq_len)
            # An example truncated before its answer has no loss tokens (a batch of those has a NaN loss).
            cache[j] = it if any(l != -100 for l in it["labels"][1:]) else None
        return cache[j]

    items = []
    for j in order:
        if len(items) == n_batches * cfg.chat.batch_size:
            break
        if item(j) is not None:
            items.append(item(j))
    if not items:
        raise PktError(f"every chat example is truncated before its answer at seq_len={cfg.seq_len}")
    # Length buckets: within windows of 8 batches, sort by length before cutting batches, then
    # shuffle the batches; padding (a third of the tokens otherwise) drops, the order stays random.
    bs = cfg.chat.batch_size
    groups = []
    for w in range(0, len(items) - bs + 1, 8 * bs):
        window = sorted(items[w:w + 8 * bs], key=lambda it: len(it["input_ids"]))
        groups += [window[i:i + bs] for i in range(0, len(window) - bs + 1, bs)]
    perm = torch.randperm(len(groups), generator=g).tolist()
    out = []
    for i in perm:
        b = collate(groups[i], tokenizer.pad_token_id)
        out.append({"input_ids": b.input_ids, "attention_mask": b.attention_mask, "labels": b.labels})
    return out


def with_replay(chat: list[dict[str, torch.Tensor]], base: list[dict[str, torch.Tensor]], share: float
                ) -> list[dict[str, torch.Tensor]]:
    """``chat`` batches with ``round(share * len(chat))`` base batches spread evenly among them.

    The base batches are taken from the end of ``base`` backwards, the blocks seen last in
    pre-training, so replay costs no extra tokenisation and is deterministic.
    """
    n = min(len(base), round(share * len(chat)))
    if n <= 0:
        return list(chat)
    out: list[dict[str, torch.Tensor]] = []
    r = 0  # replay batches placed so far
    for i, b in enumerate(chat):
        out.append(b)
        while r < (i + 1) * n // len(chat):  # spread evenly: r reaches n after the last chat batch
            out.append(base[len(base) - 1 - r])
            r += 1
    return out

def _role_model(cfg: PairConfig, role: str) -> ModelConfig:
    return cfg.teacher if role == "teacher" else cfg.student


def _stage_config(cfg: PairConfig, role: str, variant: str) -> TrainConfig:
    """The stage's training config with the learning rate of this model's width."""
    stage = cfg.base if variant == "base" else cfg.chat
    return replace(stage, lr=stage.lr_for(_role_model(cfg, role).hidden_size))


def _train(model, batches, cfg: PairConfig, variant: str, *, seed: int, role: str, progress=None,
           run_dir: Path | None = None) -> TrainLog:
    """One stage of ``role``'s training: the stage's config at this width, the model's autocast."""
    return train_stage(model, batches, _stage_config(cfg, role, variant), seed=seed,
                       autocast=_role_model(cfg, role).autocast, progress=progress, run_dir=run_dir)


def train_base(model, batches, cfg: PairConfig, *, seed: int, role: str = "teacher", progress=None,
               run_dir: Path | None = None) -> TrainLog:
    """Pre-train ``role``'s model on base-corpus ``batches`` (:func:`base_batches`)."""
    return _train(model, batches, cfg, "base", seed=seed, role=role, progress=progress, run_dir=run_dir)


def train_chat(model, batches, cfg: PairConfig, *, seed: int, role: str = "teacher", progress=None,
               run_dir: Path | None = None) -> TrainLog:
    """Fine-tune ``role``'s base model on chat ``batches`` (:func:`chat_batches` with replay)."""
    return _train(model, batches, cfg, "chat", seed=seed, role=role, progress=progress, run_dir=run_dir)


def _stage_cost(cfg: PairConfig, n_base_tokens: int, n_chat_tokens: int) -> dict[str, float]:
    """Relative compute of each stage (tokens x non-embedding parameters), for the progress bar."""
    def p(m: ModelConfig) -> float:
        return m.n_layers * (4 * m.hidden_size ** 2 + 3 * m.hidden_size * m.intermediate_size) + 2 * cfg.vocab_size * m.hidden_size
    return {"teacher-base": n_base_tokens * p(cfg.teacher), "student-base": n_base_tokens * p(cfg.student),
            "teacher-chat": n_chat_tokens * p(cfg.teacher), "student-chat": n_chat_tokens * p(cfg.student)}


def build_pair(preset: str = "default", *, seed: int = 0, force: bool = False, progress: bool = True,
               config: PairConfig | None = None, root: Path | None = None,
               only: Sequence[str] | None = None) -> PocketPair:
    """Train (or find) the four checkpoints of ``preset`` with ``seed``. Resumable per checkpoint.

    Each checkpoint is trained under its own lock, so concurrent callers share the work instead
    of repeating it; ``only`` restricts this call to some checkpoints (a chat checkpoint needs
    its base). ``config``/``root`` override the preset (tests use an even smaller configuration).
    """
    cfg = for_this_machine(config) if config else get_preset(preset)
    root = root or pair_dir(preset, seed)
    pair = PocketPair.at(root, "chat")
    paths = pair.checkpoints()
    names = [n for n in CHECKPOINTS if only is None or n in only]
    if only is not None and set(only) - set(CHECKPOINTS):
        raise PktError(f"unknown checkpoints {sorted(set(only) - set(CHECKPOINTS))}; expected some of {CHECKPOINTS}")

    def done(name: str) -> bool:
        return (paths[name] / "card.json").is_file()

    with locked(root.with_name(root.name + ".lock")):
        if force:
            shutil.rmtree(root, ignore_errors=True)
        if all(done(n) for n in names):
            return pair
        root.mkdir(parents=True, exist_ok=True)
        docs = base_corpus(cfg.suite)
        tok_dir = root / "tokenizer"
        if not (tok_dir / "tokenizer.json").is_file():
            chat = chat_examples(cfg.suite)
            texts = docs + [format_prompt(ex.messages) + ex.answer for ex in chat]
            # The tiny preset trains its tokenizer on a slice too (byte-level BPE round-trips any text).
            texts = random.Random(0).sample(texts, max(200, int(len(texts) * min(1.0, 10 * cfg.corpus_share))))
            train_tokenizer(texts, cfg.vocab_size).save_pretrained(tok_dir)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(tok_dir)
    torch_threads = torch.get_num_threads()
    t_start = time.perf_counter()
    bb = base_batches(tokenizer, docs, cfg, seed=seed)
    cb = with_replay(chat_batches(tokenizer, chat_examples(cfg.suite), cfg, seed=seed), bb, cfg.chat.replay)
    n_tok = {"base": sum(b["input_ids"].numel() for b in bb), "chat": sum(b["input_ids"].numel() for b in cb)}
    cost = {n: c for n, c in _stage_cost(cfg, n_tok["base"], n_tok["chat"]).items() if n in names}
    # The bar advances by compute (tokens x parameters), so its time-left estimate holds across
    # the four stages although they run at very different token rates.
    bar = tqdm(total=round(sum(cost.values()) / 1e9, 2), disable=not progress, desc=f"pocket pair {preset}",
               bar_format="{desc}: {percentage:3.0f}%|{bar}| {elapsed} elapsed, {remaining} left {postfix}")
    for name in names:
        role, variant = name.split("-")
        with locked(root / f".{name}.lock"):
            if done(name):
                bar.update(round(cost[name] / 1e9, 2))
                continue
            if variant == "chat" and not done(f"{role}-base"):
                raise PktError(f"{name} needs {role}-base, which is not built in {root}")
            per_token = cost[name] / 1e9 / max(1, n_tok[variant])
            bar.set_postfix_str(name)
            if variant == "base":
                model = build_model(_role_model(cfg, role), tokenizer,
                                    seed=seed + (0 if role == "teacher" else 1))
                training = {}
            else:
                model = LlamaForCausalLM.from_pretrained(paths[f"{role}-base"], dtype=torch.float32)
                training = dict(read_card(paths[f"{role}-base"])["training"])
            # A stage interrupted (a killed kernel) resumes from its last checkpoint in .runs/<name>.
            log = _train(model, bb if variant == "base" else cb, cfg, variant, role=role,
                         seed=seed + (10 if variant == "chat" else 0), progress=lambda n: bar.update(n * per_token),
                         run_dir=root / ".runs" / name)
            training[variant] = asdict(log)
            card = {"name": name, "preset": preset, "seed": seed, "config_key": cfg.key(),
                    "architecture": spec(model.config).to_dict(), "parameters": sum(p.numel() for p in model.parameters()),
                    "training": training, "torch_threads": torch_threads,
                    "matmul_precision": _role_model(cfg, role).autocast or "float32", "scores": None}
            save_checkpoint(model, tokenizer, paths[name], card)
            shutil.rmtree(root / ".runs" / name, ignore_errors=True)
    bar.close()
    with contextlib.suppress(OSError):  # the stages' run folders are gone once their checkpoints are saved
        (root / ".runs").rmdir()
    write_json(root / f"build-{os.getpid()}.json", {"preset": preset, "seed": seed, "config": asdict(cfg),
                                                     "checkpoints": names, "wall_seconds": time.perf_counter() - t_start})
    return pair


def pocket_pair(variant: str = "chat", *, seed: int = 0, preset: str = "default", force: bool = False,
                progress: bool = True) -> PocketPair:
    """The pocket pair's checkpoints (building them on first use; ``force`` rebuilds).

    ``variant`` ("chat" or "base") picks what ``.teacher``/``.student`` point to.
    """
    if variant not in ("chat", "base"):
        raise PktError(f"unknown pocket-pair variant {variant!r}; expected 'chat' or 'base'")
    pair = build_pair(preset, seed=seed, force=force, progress=progress)
    return replace(pair, variant=variant)
