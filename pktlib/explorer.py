"""The neuron explorer: which neurons carry a task's answers, and what they say (paper Figure 5).

One explorer, two front ends over the same precomputed data:

* in the HTML book it runs without a kernel: the data is JSON embedded in the output, drawn by
  a small vanilla-JavaScript viewer (``explorer.js`` beside this module, inlined in the output);
* in Jupyter it is live: ipywidgets (model, family, block, layer, neuron) over the same data.

Both come from one displayed object, :class:`NeuronExplorer`, whose MIME bundle holds the
widget view and the HTML view; Jupyter draws the widget, the book (``text/html`` ranks above
widget views in ``_config.yml``) draws the HTML.

:func:`explorer_data` computes the data from attribution results
(:func:`pktlib.attribution.attribute` with ``per_example=True``): for each model, block (FFN
neurons are ``down_proj`` columns, attention neurons ``o_proj`` columns), layer and family,
the ``k_neurons`` best neurons by summed score; for each, the tokens its value vector promotes
and suppresses through the logit lens (``E (g * w)``, the largest and smallest logits; units
are logits of the unnormalised residual direction, so compare within a neuron) and the
examples where its score is highest (the log-probability it adds to the answer's target
token, DESIGN.md 4.2).
"""
from __future__ import annotations

import html
import json
from dataclasses import dataclass
from importlib import resources
from typing import Any, Mapping, Sequence

import torch

from pktlib.attribution import KINDS, Attribution
from pktlib.lens import LogitLens
from pktlib.errors import PktError
from pktlib.models import spec

__all__ = ["FORMAT", "value_tokens", "explorer_data", "NeuronExplorer", "viewer_html", "data_from_html",
           "neuron_view", "ranked", "best_layer"]

FORMAT = "pktlib-neuron-explorer/1"
KIND_LABEL = {"ffn": "FFN", "attn": "attention"}


@torch.no_grad()
def value_tokens(model, tokenizer, layer: int, kind: str, neurons: Sequence[int], k: int = 8,
                 ) -> list[tuple[list[tuple[str, float]], list[tuple[str, float]]]]:
    """Per neuron, ``(promoted, suppressed)``: the ``k`` tokens with the largest and the smallest
    logit-lens logits of its value vector (column of ``down_proj``/``o_proj`` times the final
    norm weight, unembedded), each as ``(token text, logit)``."""
    s = spec(model)
    W = s.weight(model, layer, "down_proj" if kind == "ffn" else "o_proj").detach()  # (d, N)
    idx = torch.tensor([int(j) for j in neurons], dtype=torch.long, device=W.device)
    U = LogitLens.of(model, s).directions(W[:, idx])  # (V, n)
    k = min(k, U.shape[0])
    top_v, top_i = U.topk(k, dim=0)
    low_v, low_i = (-U).topk(k, dim=0)

    def col(vals, ids, c, sign):
        return [(tokenizer.decode([int(ids[r, c])]), round(sign * float(vals[r, c]), 3)) for r in range(k)]

    return [(col(top_v, top_i, c, 1), col(low_v, low_i, c, -1)) for c in range(len(neurons))]


def _tail(text: str, n: int) -> str:
    return text if len(text) <= n else "…" + text[-(n - 1):]


def explorer_data(models: Mapping[str, tuple[Any, Any]], attributions: Mapping[tuple[str, str], Attribution],
                  pairs: Mapping[str, Sequence[tuple[str, str]]], *, k_neurons: int = 8, n_tokens: int = 8,
                  n_examples: int = 4, kinds: Sequence[str] = KINDS, max_chars: int = 160) -> dict[str, Any]:
    """The explorer's data (JSON-ready) from ``models`` (role -> (model, tokenizer)),
    ``attributions`` ((family, role) -> :class:`Attribution` with per-example scores, as the
    attribution chapter computes them) and ``pairs`` (family -> the (prompt, answer) pairs
    attributed, in order). Raises :class:`PktError` when an attribution lacks per-example
    scores or its example count differs from its pairs."""
    families = [f for f in pairs if any((f, r) in attributions for r in models)]
    if not families:
        raise PktError("no attribution matches the families and models given")
    examples: dict[str, list[dict[str, Any]]] = {}
    for fam in families:
        examples[fam] = [{"prompt": _tail(p, max_chars), "answer": _tail(a, max_chars), "target": {}} for p, a in pairs[fam]]
    out: dict[str, Any] = {"format": FORMAT, "families": families, "examples": examples, "models": {},
                           "kinds": {k: KIND_LABEL[k] for k in kinds}}
    for role, (model, tok) in models.items():
        attrs = {fam: attributions[fam, role] for fam in families if (fam, role) in attributions}
        for fam, a in attrs.items():
            if a.ffn_per_example is None or a.attn_per_example is None:
                raise PktError(f"attribution of {role} on {fam} has no per-example scores; use attribute(..., per_example=True)")
            if a.n_examples != len(pairs[fam]):
                raise PktError(f"attribution of {role} on {fam} has {a.n_examples} examples but {len(pairs[fam])} pairs")
            for i, t in enumerate(a.targets.tolist()):
                examples[fam][i]["target"][role] = tok.decode([int(t)])
        s = spec(model)
        entry: dict[str, Any] = {"n_layers": s.n_layers, "families": list(attrs), "kinds": {}}
        for kind in kinds:
            layers = {}
            for layer in range(s.n_layers):
                chosen: dict[int, float] = {}
                for a in attrs.values():
                    S = a.scores(kind)[layer]
                    vals, ids = S.topk(min(k_neurons, S.numel()))
                    for v, j in zip(vals.tolist(), ids.tolist()):
                        chosen[j] = max(chosen.get(j, float("-inf")), v)
                order = sorted(chosen, key=lambda j: -chosen[j])
                toks = value_tokens(model, tok, layer, kind, order, n_tokens) if order else []
                rows = []
                for j, (promoted, suppressed) in zip(order, toks):
                    per_fam_scores, acts = {}, {}
                    for fam, a in attrs.items():
                        per = a.scores(kind)[layer, j]
                        per_fam_scores[fam] = round(float(per), 4)
                        ex = (a.ffn_per_example if kind == "ffn" else a.attn_per_example)[:, layer, j]
                        vals, ids = ex.topk(min(n_examples, ex.numel()))
                        acts[fam] = [[int(i), round(float(v), 4)] for v, i in zip(vals, ids) if float(v) > 0]
                    rows.append({"neuron": j, "score": per_fam_scores, "promoted": [list(t) for t in promoted],
                                 "suppressed": [list(t) for t in suppressed], "examples": acts})
                layers[str(layer)] = rows
            entry["kinds"][kind] = {"n_neurons": s.n_neurons(kind), "layers": layers}
        out["models"][role] = entry
    return out


# ================================================================================ views


def _viewer_js() -> str:
    return resources.files("pktlib").joinpath("explorer.js").read_text(encoding="utf-8")


def viewer_html(data: Mapping[str, Any], *, element_id: str = "pkt-explorer") -> str:
    """A self-contained HTML view: the data as a JSON script, the viewer inlined (no external
    file, no network, no kernel). Shows a static summary if JavaScript does not run."""
    payload = json.dumps(data, ensure_ascii=False, separators=(",", ":")).replace("</", "<\\/")
    n = sum(len(rows) for m in data["models"].values() for k in m["kinds"].values() for rows in k["layers"].values())
    return (f'<div class="pkt-explorer" id="{html.escape(element_id)}" data-format="{FORMAT}">'
            f'<p class="pkt-explorer-fallback">Neuron explorer: {n} located neurons of '
            f'{html.escape(", ".join(data["models"]))} (needs JavaScript).</p>'
            f'<script type="application/json" class="pkt-explorer-data">{payload}</script></div>'
            f"<script>{_viewer_js()}</script>")


def ranked(data: Mapping[str, Any], role: str, kind: str, layer: int, family: str) -> list[dict[str, Any]]:
    """A layer's located neurons, best first by their summed score on ``family`` (the order both
    front ends list them in)."""
    rows = data["models"][role]["kinds"][kind]["layers"].get(str(layer), [])
    return sorted(rows, key=lambda r: -r["score"].get(family, float("-inf")))


def best_layer(data: Mapping[str, Any], role: str, kind: str, family: str) -> int:
    """The layer holding ``family``'s best located neuron (where both front ends start)."""
    layers = data["models"][role]["kinds"][kind]["layers"]
    scored = [(r["score"][family], int(l)) for l, rows in layers.items() for r in rows if family in r["score"]]
    return max(scored)[1] if scored else 0


def data_from_html(text: str) -> dict[str, Any] | None:
    """The data embedded in a :func:`viewer_html` output, or None when ``text`` holds none."""
    head = 'class="pkt-explorer-data">'
    if head not in text:
        return None
    payload = text.split(head, 1)[1].split("</script>", 1)[0]
    try:
        data = json.loads(payload)  # "<\\/" (escaped in viewer_html) is JSON for "</"
    except ValueError:
        return None
    return data if isinstance(data, dict) and data.get("format") == FORMAT else None


def neuron_view(data: Mapping[str, Any], role: str, kind: str, layer: int, rank: int, family: str) -> str:
    """HTML of the ``rank``-th neuron of :func:`ranked` (the widget's view; the JavaScript viewer
    draws the same layout)."""
    rows = ranked(data, role, kind, layer, family)
    if not rows:
        return "<p>No located neurons in this layer.</p>"
    row = rows[min(rank, len(rows) - 1)]
    esc = lambda t: html.escape(repr(t)[1:-1])  # noqa: E731  visible whitespace, escaped HTML

    def chips(items, cls):
        return "".join(f'<span class="pkt-tok {cls}" title="logit {v:+.2f}">{esc(t)}</span>' for t, v in items)

    ex_rows = []
    for i, sc in row["examples"].get(family, []):
        e = data["examples"][family][i]
        ex_rows.append(f"<tr><td>{i}</td><td>{sc:+.3f}</td><td><code>{esc(e['target'].get(role, ''))}</code></td>"
                       f"<td><code>{esc(e['prompt'])}</code> → <code>{esc(e['answer'])}</code></td></tr>")
    score = row["score"].get(family)
    return (f"<p><b>{html.escape(role)}</b>, {KIND_LABEL[kind]} layer {layer}, neuron {row['neuron']}: "
            f"summed score on {html.escape(family)} {score:+.3f}</p>"
            f"<p>promotes {chips(row['promoted'], 'pkt-up')}</p><p>suppresses {chips(row['suppressed'], 'pkt-down')}</p>"
            + ("<table><tr><th>example</th><th>score</th><th>target</th><th>prompt → answer</th></tr>"
               + "".join(ex_rows) + "</table>" if ex_rows else f"<p>It raises the target on no {html.escape(family)} example.</p>"))


@dataclass
class NeuronExplorer:
    """Display it (last expression of a cell): a live widget in Jupyter, the JavaScript viewer in
    the HTML book. ``data`` is :func:`explorer_data`'s result."""

    data: dict[str, Any]

    @classmethod
    def from_attribution(cls, models, attributions, pairs, **kwargs) -> "NeuronExplorer":
        return cls(explorer_data(models, attributions, pairs, **kwargs))

    def to_json(self) -> str:
        return json.dumps(self.data, ensure_ascii=False)

    def widget(self):
        """The ipywidgets front end (needs ipywidgets)."""
        import ipywidgets as W

        d = self.data
        role_w = W.Dropdown(options=list(d["models"]), description="model")
        fam_w = W.Dropdown(options=d["families"], description="family")
        kind_w = W.ToggleButtons(options=[(v, k) for k, v in d["kinds"].items()], description="block")
        layer_w = W.Dropdown(description="layer")
        neuron_w = W.Dropdown(description="neuron")
        out = W.HTML()

        def layers(*_):
            layer_w.options = list(range(d["models"][role_w.value]["n_layers"]))

        def neurons(*_):
            if layer_w.value is None:
                return
            rows = ranked(d, role_w.value, kind_w.value, layer_w.value, fam_w.value)
            neuron_w.options = [(f"{r['neuron']} (score {r['score'].get(fam_w.value, 0):+.2f})", i) for i, r in enumerate(rows)]
            neuron_w.value = 0 if rows else None  # the best neuron, as the viewer in the book

        def show(*_):
            if layer_w.value is not None and neuron_w.value is not None:
                out.value = neuron_view(d, role_w.value, kind_w.value, layer_w.value, neuron_w.value, fam_w.value)

        def jump(*_):
            layer_w.value = best_layer(d, role_w.value, kind_w.value, fam_w.value)

        role_w.observe(layers, "value")
        for w in (role_w, kind_w):
            w.observe(jump, "value")
        for w in (role_w, kind_w, layer_w, fam_w):
            w.observe(neurons, "value")
        for w in (role_w, kind_w, layer_w, neuron_w, fam_w):
            w.observe(show, "value")
        layers()
        jump()
        neurons()
        show()
        return W.VBox([W.HBox([role_w, fam_w]), kind_w, W.HBox([layer_w, neuron_w]), out])

    def _repr_mimebundle_(self, include=None, exclude=None) -> dict[str, Any]:
        bundle: dict[str, Any] = {"text/plain": f"NeuronExplorer({', '.join(self.data['models'])}; "
                                                f"families {', '.join(self.data['families'])})",
                                  "text/html": viewer_html(self.data)}
        try:
            w = self.widget()
        except ImportError:
            return bundle
        wb = w._repr_mimebundle_() or {}
        if "application/vnd.jupyter.widget-view+json" in wb:
            bundle["application/vnd.jupyter.widget-view+json"] = wb["application/vnd.jupyter.widget-view+json"]
        return bundle
