"""Forward hooks, only through context managers that remove them in ``finally``.

>>> with capture(model, {"up3": spec.module(model, 3, "up_proj")}) as acts:
...     model(**batch)
>>> acts["up3"]            # output of that module, (B, T, d)

``capture`` records outputs (or inputs with ``what="input"``); :func:`hooked` is the general
form used by everything else (a function per module that may also *replace* the output).

:func:`with_grad` is the other switch of how a model runs during a call: gradient mode, for the
functions that differentiate (sensitivity, fine-tuning, LaTen alignment, pocket-pair training).
"""
from __future__ import annotations

import functools
from contextlib import contextmanager
from typing import Callable, Iterator, Mapping, TypeVar

import torch
from torch import nn

from pktlib.errors import PktError

__all__ = ["hooked", "capture", "with_grad"]

F = TypeVar("F", bound=Callable)


def with_grad(fn: F) -> F:
    """Run ``fn`` with gradients enabled, also when the caller is inside ``torch.no_grad()``.

    A function that needs gradients (a backward pass) must not silently depend on its caller's
    grad mode: under ``no_grad`` the loss would have no graph and ``backward`` would fail deep
    inside. ``torch.inference_mode()`` cannot be overridden (its tensors never join a graph),
    so it is a clear :class:`PktError` instead.
    """
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if torch.is_inference_mode_enabled():
            raise PktError(f"{fn.__qualname__} computes gradients, which torch.inference_mode() forbids; "
                           "call it outside the inference_mode block")
        with torch.enable_grad():
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]

Hook = Callable[[nn.Module, tuple, object], object]


@contextmanager
def hooked(hooks: Mapping[nn.Module, Hook | list[Hook]], *, pre: bool = False) -> Iterator[None]:
    """Register forward (or forward-pre with ``pre=True``) hooks; always removed on exit."""
    handles = []
    try:
        for module, fns in hooks.items():
            for fn in fns if isinstance(fns, list) else [fns]:
                if pre:
                    handles.append(module.register_forward_pre_hook(fn))
                else:
                    handles.append(module.register_forward_hook(fn))
        yield
    finally:
        for h in handles:
            h.remove()


def _first(x):
    return x[0] if isinstance(x, (tuple, list)) else x


@contextmanager
def capture(model: nn.Module, modules: Mapping[str, nn.Module], *, what: str = "output",
            detach: bool = True, reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
            ) -> Iterator[dict[str, torch.Tensor | list[torch.Tensor]]]:
    """Record each named module's output (or first positional input) during the ``with`` body.

    A module called once leaves a tensor under its name; called several times (several
    forward passes in the body), a list. ``reduce`` is applied to each captured tensor first
    (e.g. a mean over tokens), which bounds memory when streaming many batches.
    """
    if what not in ("output", "input"):
        raise ValueError(f"what={what!r}; expected 'output' or 'input'")
    store: dict[str, list[torch.Tensor]] = {name: [] for name in modules}
    result: dict[str, torch.Tensor | list[torch.Tensor]] = {}

    def make(name: str) -> Hook:
        def fn(module, args, output=None):
            t = _first(args) if what == "input" else _first(output)
            t = t.detach() if detach else t
            store[name].append(reduce(t) if reduce else t)

        return fn

    hooks = {m: make(n) for n, m in modules.items()}
    try:
        with hooked(hooks, pre=(what == "input")):
            yield result
    finally:
        for n, vals in store.items():
            result[n] = vals[0] if len(vals) == 1 else vals
