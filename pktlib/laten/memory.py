"""LaTen's memory at scale: what one alignment step needs with both models on one device (estimates).

The reproduce chapter sizes a Llama-2-13B -> 7B run with it; ``benchmarks/laten_step.py``
measures the pocket pair beside it.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from pktlib.errors import PktError
from pktlib.models import TRANSFERRED_MODULES, ModelSpec, spec
from pktlib.selection import layer_budget

__all__ = ["MemoryEstimate", "memory_estimate"]


_BYTES = {"fp32": 4, "float32": 4, "bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2}


@dataclass
class MemoryEstimate:
    """Bytes one alignment step needs with both models on one device (estimates, not measurements)."""

    teacher_weights: int
    student_weights: int
    injected_weight_copies: int  # W + delta of every touched weight, kept for the backward pass
    activations: int  # student forward/backward on the batch (saved tensors + logits)
    translator: int  # float32 weights
    translator_grads: int
    optimizer_state: int  # AdamW: two float32 moments per translator weight
    extracted: int  # teacher slices and translated outputs (with their autograd buffers)
    attribution: int  # the largest (vocab x chunk) blocks of the logit-lens scoring
    detail: dict[str, Any] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(v for k, v in asdict(self).items() if isinstance(v, int))

    def table(self) -> list[tuple[str, float]]:
        """``[(part, GiB), ...]`` including the total."""
        rows = [(k, v / 2**30) for k, v in asdict(self).items() if isinstance(v, int)]
        return rows + [("total", self.total / 2**30)]


def memory_estimate(teacher: Any, student: Any, *, dtype: str = "bf16", batch: int = 16, seq_len: int = 512,
                    transfer_rate: float = 0.1, chunk_size: int = 4096) -> MemoryEstimate:
    """Estimate the memory of one LaTen alignment step (DESIGN.md 4.3) for a pair of configs/specs.

    Counts: both models' weights in ``dtype``; a copy of every injected weight (up, down, v, o of
    the student's ``L_sel`` layers: ``functional_call`` builds ``W + delta`` and autograd keeps it
    to propagate gradients to earlier layers); student activations saved for the backward pass,
    about ``(10 d + 4 I)`` values per token and layer plus float32 logits and their gradient
    (``2 x 4 V`` bytes per token); the float32 translator ``4 x (d_T^2 + d_T d_S)`` weights, its
    gradients and two AdamW moments; the extracted and translated neuron weights; and the
    attribution's ``(vocab x chunk_size)`` float32 blocks (a few at a time).
    """
    ts = teacher if isinstance(teacher, ModelSpec) else spec(teacher)
    ss = student if isinstance(student, ModelSpec) else spec(student)
    if dtype not in _BYTES:
        raise PktError(f"unknown dtype {dtype!r}; expected one of {sorted(_BYTES)}")
    b = _BYTES[dtype]
    n_sel, k_ffn, k_attn = layer_budget(ts, ss, transfer_rate)
    dT, dS, I, V = ts.hidden_size, ss.hidden_size, ss.intermediate_size, ss.vocab_size
    touched = n_sel * (2 * dS * I + dS * ss.kv_size + dS * ss.attn_size)  # up, down, v, o weights
    tokens = batch * seq_len
    acts = ss.n_layers * tokens * (10 * dS + 4 * I) * b + tokens * V * 4 * 2
    n_tr = len(TRANSFERRED_MODULES) * (dT * dT + dT * dS)
    # Teacher slices (float32) + translated outputs (float32) + the MLP's hidden activations (d_T per neuron).
    n_neur = n_sel * 2 * (k_ffn + k_attn)  # neurons over up+down (k_ffn each) and v+o (k_attn each)
    extracted = n_neur * (dT + dS + dT) * 4
    attribution = 3 * max(ts.vocab_size, V) * min(chunk_size, max(ts.intermediate_size, ts.attn_size)) * 4
    return MemoryEstimate(
        teacher_weights=ts.n_parameters * b, student_weights=ss.n_parameters * b,
        injected_weight_copies=touched * b, activations=acts, translator=n_tr * 4, translator_grads=n_tr * 4,
        optimizer_state=n_tr * 8, extracted=extracted, attribution=attribution,
        detail={"dtype": dtype, "batch": batch, "seq_len": seq_len, "transfer_rate": transfer_rate,
                "n_layers_selected": n_sel, "k_ffn": k_ffn, "k_attn": k_attn, "translator_params": n_tr,
                "teacher_params": ts.n_parameters, "student_params": ss.n_parameters},
    )
