"""The LaTen translator: a small MLP per module mapping teacher neuron weights to student size.

DESIGN.md 4.3 (paper Section 4, original ``knowledge_translator.py``): for each transferred
module (up_proj, down_proj, v_proj, o_proj) an MLP ``d_T -> d_T -> d_S`` with a ReLU between,
no biases, weights drawn from N(0, (1e-5)^2), applied along the *hidden-size* axis of the
extracted neuron weights. Row modules (up, v) hold a neuron's weights as ``[L, k, d_T]`` and
are mapped directly; column modules (down, o) hold ``[L, d_T, k]`` and are transposed, mapped
and transposed back. The translator computes in float32 whatever the models' dtype.

A translator is saved as ``translator.safetensors`` plus ``translator.json`` (its config).
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from pktlib.errors import PktError
from pktlib.models import MODULES, NEURON_MODULES, TRANSFERRED_MODULES
from pktlib.records import atomic_path, write_json

__all__ = ["TranslatorConfig", "Translator", "translate_along_hidden", "translation_penalty",
           "save_translator", "load_translator", "WEIGHTS_NAME", "CONFIG_NAME"]

WEIGHTS_NAME = "translator.safetensors"
CONFIG_NAME = "translator.json"


@dataclass
class TranslatorConfig:
    d_teacher: int = field(metadata={"help": "teacher hidden size d_T (input of each MLP)"})
    d_student: int = field(metadata={"help": "student hidden size d_S (output of each MLP)"})
    modules: tuple[str, ...] = field(default=TRANSFERRED_MODULES, metadata={"help": "modules translated"})
    hidden: int | None = field(default=None, metadata={"help": "MLP hidden width; None = d_T as in the paper"})
    init_std: float = field(default=1e-5, metadata={"help": "std of the normal weight init"})

    def __post_init__(self) -> None:
        self.modules = tuple(self.modules)
        if self.d_teacher <= 0 or self.d_student <= 0:
            raise PktError(f"`d_teacher`/`d_student` must be positive, got {self.d_teacher}/{self.d_student}")
        bad = [m for m in self.modules if m not in NEURON_MODULES]
        if bad:
            raise PktError(f"`modules` holds {bad}; translatable modules: {sorted(NEURON_MODULES)}")
        if self.hidden is None:
            self.hidden = self.d_teacher

    def to_dict(self) -> dict:
        d = asdict(self)
        d["modules"] = list(self.modules)
        return d


def translate_along_hidden(mlp: nn.Module, w: torch.Tensor, axis: int) -> torch.Tensor:
    """Apply ``mlp`` (d_T -> d_S) to the hidden-size axis of extracted weights.

    ``axis=0`` (row modules): ``w`` is ``(L, k, d_T)`` -> ``(L, k, d_S)``.
    ``axis=1`` (column modules): ``w`` is ``(L, d_T, k)`` -> ``(L, d_S, k)``.
    """
    if axis == 0:
        return mlp(w)
    return mlp(w.transpose(-1, -2)).transpose(-1, -2)


def translation_penalty(translated: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum over modules of mean(translated^2): the paper's MSE-to-zero constraint (before x1000)."""
    terms = [t.pow(2).mean() for t in translated.values() if t.numel()]
    if not terms:
        return torch.zeros(())
    return torch.stack(terms).sum()


class Translator(nn.Module):
    """One ``Linear(d_T, h) -> ReLU -> Linear(h, d_S)`` per module (no biases)."""

    def __init__(self, config: TranslatorConfig, *, generator: torch.Generator | None = None):
        super().__init__()
        self.config = config
        c = config
        self.mlps = nn.ModuleDict({
            m: nn.Sequential(nn.Linear(c.d_teacher, c.hidden, bias=False, dtype=torch.float32), nn.ReLU(),
                             nn.Linear(c.hidden, c.d_student, bias=False, dtype=torch.float32))
            for m in c.modules
        })
        with torch.no_grad():
            for p in self.parameters():
                p.normal_(0.0, c.init_std, generator=generator)

    def forward(self, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Translate ``{module: extracted weights}`` (shapes as :class:`~pktlib.extraction.NeuronSlice`)."""
        out = {}
        for m, w in weights.items():
            if m not in self.mlps:
                raise PktError(f"translator has no MLP for {m!r}; it translates {list(self.mlps)}")
            axis = MODULES[m].neuron_axis
            d_in = w.shape[-1] if axis == 0 else w.shape[-2]
            if w.dim() != 3 or d_in != self.config.d_teacher:
                raise PktError(f"{m}: extracted weights of shape {tuple(w.shape)} do not have the teacher "
                               f"hidden size {self.config.d_teacher} on axis {-1 if axis == 0 else -2}")
            out[m] = translate_along_hidden(self.mlps[m], w.to(torch.float32), axis)
        return out


def save_translator(translator: Translator, directory: str | os.PathLike) -> Path:
    """Write ``translator.safetensors`` and ``translator.json`` into ``directory``."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in translator.state_dict().items()}
    with atomic_path(d / WEIGHTS_NAME) as tmp:
        save_file(state, str(tmp))
    write_json(d / CONFIG_NAME, translator.config.to_dict())
    return d


def load_translator(directory: str | os.PathLike, *, device: str | torch.device = "cpu") -> Translator:
    """Load a translator written by :func:`save_translator`."""
    d = Path(directory)
    if not (d / WEIGHTS_NAME).is_file() or not (d / CONFIG_NAME).is_file():
        raise PktError(f"no translator in {d} (expected {WEIGHTS_NAME} and {CONFIG_NAME})")
    try:
        config = TranslatorConfig(**json.loads((d / CONFIG_NAME).read_text()))
    except (TypeError, json.JSONDecodeError) as e:
        raise PktError(f"{d / CONFIG_NAME}: bad translator config ({e})") from None
    t = Translator(config)
    t.load_state_dict(load_file(str(d / WEIGHTS_NAME)))
    return t.to(device)
