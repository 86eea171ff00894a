"""A Sphinx extension that shapes the executed notebooks as the book's readers see them.

Registered in ``_config.yml`` (``sphinx: extra_extensions``). Everything happens at build time,
on the text Sphinx reads (the ``source-read`` event); the executed notebooks in ``book/`` and
their sources in ``notebooks/`` are left as they are.

* **Set-up cells collapse.** The code cells between a chapter's title cell and its next
  Markdown cell (imports, parameters, loading the models), and papermill's ``parameters`` /
  ``injected-parameters`` cells wherever they are, get the myst-nb tag ``hide-cell`` (no
  output) or ``hide-input`` (their output stays visible). Cells that draw a figure get
  ``hide-input``: the reader sees the figure and its caption, the code one click away. Cells
  that already carry a ``hide-*``/``remove-*`` tag keep their own choice.
* **Neuron explorers** (:mod:`pktlib.explorer`) are redrawn with the current viewer from the
  data the chapter embedded when it ran.
* **Noise goes.** Progress bars (tqdm's text and widget views, in any output) are dropped;
  stderr (warnings, logging) is removed by myst-nb's ``nb_output_stderr: remove``.
* **Figures get captions** from ``book/figures.yml`` (config ``pkt_figures``): per chapter, a
  list of ``{match: regex, caption: text, paper: "Figure 3"}``; the first figure cell whose
  source matches ``match`` gets the caption (and the sentence naming the paper figure it
  mirrors) as myst-nb figure metadata. A figure with no caption and a caption that matches no
  figure are reported as warnings (``pkt.caption``), and ``make check-book`` fails on a figure
  without a caption.
* **The results dashboard** (:func:`write_dashboard`) is drawn from the records
  (``book/*.record.json``, and ``runs/scale/**/*.record.json`` of real pairs; config ``pkt_records``)
  into ``book/_generated/`` when the build starts; ``book/intro.md`` includes it and is
  rewritten on every build.
* **Offline assets** must be installed (``make assets``, :mod:`pktlib.book.assets`): the build
  stops with that instruction when they are not.
"""
from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

import matplotlib
import matplotlib.pyplot as plt
import yaml
from sphinx.errors import ConfigError
from sphinx.util import logging

from pktlib import dashboard, plots
from pktlib.book import assets
from pktlib.errors import PktError
from pktlib.records import atomic_path, atomic_write_text, read_json

__all__ = ["PROGRESS_RE", "is_progress_output", "setup_cell_indices", "figure_cell_indices",
           "load_captions", "clean_notebook", "load_all_records", "write_dashboard", "setup"]

# tqdm's bar: "desc:  40%|████      | 26/64 [00:01<00:02, 17.2it/s]"
PROGRESS_RE = re.compile(r"\d{1,3}%\|[^|\n]*\|\s*[\d.]+[kMG]?/[\d.?]+[kMG]?\s*\[")
FIGURE_MIMES = ("image/png", "image/svg+xml", "image/jpeg", "image/gif")
KEEP_TAG_PREFIXES = ("hide-", "remove-", "remove_")


def _text(value: Any) -> str:
    return "".join(value) if isinstance(value, list) else str(value or "")


def is_progress_output(output: Mapping[str, Any]) -> bool:
    """True for a progress bar: a stream, or a display (widget or text) showing tqdm's bar."""
    if output.get("output_type") == "stream":
        return bool(PROGRESS_RE.search(_text(output.get("text"))))
    data = output.get("data") or {}
    if output.get("output_type") in ("display_data", "execute_result", "update_display_data"):
        text = _text(data.get("text/plain"))
        return bool(PROGRESS_RE.search(text)) and not any(m in data for m in FIGURE_MIMES)
    return False


def _has_figure(cell: Mapping[str, Any]) -> bool:
    return any(any(m in (o.get("data") or {}) for m in FIGURE_MIMES) for o in cell.get("outputs", []))


def setup_cell_indices(cells: Sequence[Mapping[str, Any]]) -> list[int]:
    """Code cells before the first Markdown cell that follows the title, and papermill's
    parameter cells (``parameters``, ``injected-parameters``) anywhere."""
    out, seen_title = [], False
    for i, c in enumerate(cells):
        if c.get("cell_type") == "markdown":
            if seen_title:
                break
            seen_title = True
        elif c.get("cell_type") == "code":
            out.append(i)
    for i, c in enumerate(cells):
        tags = (c.get("metadata") or {}).get("tags") or []
        if c.get("cell_type") == "code" and {"parameters", "injected-parameters"} & set(tags) and i not in out:
            out.append(i)
    return sorted(out)


def figure_cell_indices(cells: Sequence[Mapping[str, Any]]) -> list[int]:
    """Code cells with an image output."""
    return [i for i, c in enumerate(cells) if c.get("cell_type") == "code" and _has_figure(c)]


def load_captions(path: str | Path) -> dict[str, list[dict[str, str]]]:
    """``book/figures.yml``: chapter name -> list of ``{match, caption, paper?}``."""

    path = Path(path)
    if not path.is_file():
        return {}
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise PktError(f"{where}: malformed YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(data, dict):
        raise PktError(f"{path}: expected a mapping chapter -> list of captions")
    for chapter, entries in data.items():
        for j, e in enumerate(entries or []):
            if not isinstance(e, dict) or not {"match", "caption"} <= set(e):
                raise PktError(f"{path}: {chapter} entry {j + 1} needs 'match' and 'caption'")
            try:
                re.compile(str(e["match"]))
            except re.error as err:
                raise PktError(f"{path}: {chapter} entry {j + 1}: bad regex {e['match']!r} ({err})") from None
    return {str(k): list(v or []) for k, v in data.items()}


def _caption_text(entry: Mapping[str, str]) -> str:
    text = str(entry["caption"]).strip()
    if entry.get("paper"):
        text += f" Mirrors the paper's {str(entry['paper']).strip()}."
    return text


def _add_tag(cell: dict, tag: str) -> None:
    md = cell.setdefault("metadata", {})
    tags = md.setdefault("tags", [])
    if not any(t.startswith(KEEP_TAG_PREFIXES) for t in tags):
        tags.append(tag)


def clean_notebook(nb: dict, chapter: str, captions: Sequence[Mapping[str, str]] = ()) -> list[str]:
    """Shape ``nb`` (nbformat JSON as a dict, changed in place) for reading; returns warnings.

    Drops progress-bar outputs, collapses set-up cells, hides the code of figure cells,
    attaches ``captions`` (entries of ``book/figures.yml`` for ``chapter``) to figure cells and
    moves a captioned cell's other outputs (a table it also shows) into cells of their own.
    """
    cells = nb.get("cells", [])
    for c in cells:
        if c.get("cell_type") == "code" and c.get("outputs"):
            c["outputs"] = [o for o in c["outputs"] if not is_progress_output(o)]
            for o in c["outputs"]:
                _refresh_explorer(o)
    figures = figure_cell_indices(cells)
    for i in setup_cell_indices(cells):
        _add_tag(cells[i], "hide-input" if cells[i].get("outputs") else "hide-cell")
    for i in figures:
        _add_tag(cells[i], "hide-input")
    warnings, captioned = [], set()
    for j, entry in enumerate(captions):
        rx = re.compile(str(entry["match"]))
        hit = next((i for i in figures if i not in captioned and rx.search(_text(cells[i].get("source")))), None)
        if hit is None:
            warnings.append(f"{chapter}: caption {j + 1} (match {entry['match']!r}) matches no figure cell")
            continue
        captioned.add(hit)
        mystnb = cells[hit].setdefault("metadata", {}).setdefault("mystnb", {})
        fig = mystnb.setdefault("figure", {})
        fig.setdefault("caption", _caption_text(entry))
        fig.setdefault("name", f"fig-{chapter}-{j + 1}")
    for i in figures:
        if i not in captioned and not (cells[i].get("metadata", {}).get("mystnb", {}).get("figure") or {}).get("caption"):
            first = _text(cells[i].get("source")).strip().splitlines()[:1]
            warnings.append(f"{chapter}: the figure of cell {i} ({first[0][:60] if first else 'empty'!r}...) has no caption")
    # myst-nb puts the caption on every display output of the cell: a table shown by the same
    # cell would become a second captioned "figure". Such outputs move to cells of their own
    # (no source shown) just before or after the figure, in their order.
    for i in sorted(captioned, reverse=True):
        before, figs, after = _split_outputs(cells[i]["outputs"])
        if before or after:
            cells[i]["outputs"] = figs
            cells[i + 1:i + 1] = [_output_cell(after)] if after else []
            cells[i:i] = [_output_cell(before)] if before else []
    return warnings


def _refresh_explorer(output: dict) -> None:
    """Redraw a neuron explorer's HTML with the current viewer, from the data the chapter embedded
    when it ran (the data is the chapter's; the viewer is the book's)."""
    html = (output.get("data") or {}).get("text/html")
    if not html:
        return
    # Imported here: the explorer loads torch, which only pages that show an explorer need.
    from pktlib.explorer import data_from_html, viewer_html

    data = data_from_html(_text(html))
    if data is not None:
        output["data"]["text/html"] = viewer_html(data)


def _split_outputs(outputs: list[dict]) -> tuple[list[dict], list[dict], list[dict]]:
    """(outputs before the first image, the image outputs, the other outputs after it)."""
    is_fig = [any(m in (o.get("data") or {}) for m in FIGURE_MIMES) for o in outputs]
    first = is_fig.index(True) if True in is_fig else len(outputs)
    return (outputs[:first], [o for o, f in zip(outputs, is_fig) if f],
            [o for o, f in zip(outputs[first:], is_fig[first:]) if not f])


def _output_cell(outputs: list[dict]) -> dict:
    return {"cell_type": "code", "execution_count": None, "source": "", "outputs": outputs,
            "metadata": {"tags": ["remove-input"]}}


# ================================================================================ dashboard


def load_all_records(folders: Sequence[str | Path]) -> dict[str, dict[str, Any]]:
    """Records of the chapters (``folders[0]``, keyed by chapter name) and of other runs
    (later folders, searched recursively, keyed by their path from beside the folder without
    ``.record.json``, e.g. ``scale/PAIR/laten``, so two pairs' runs of one chapter stay apart).
    The scorecard's own record is left out."""

    out: dict[str, dict[str, Any]] = {}
    for k, folder in enumerate(folders):
        folder = Path(folder)
        if not folder.is_dir():
            continue
        for p in sorted(folder.glob("*.record.json") if k == 0 else folder.rglob("*.record.json")):
            stem = p.name[: -len(".record.json")]
            if stem == "scorecard":
                continue
            out[stem if k == 0 else (p.parent / stem).relative_to(folder.parent).as_posix()] = read_json(p)
    return out


def write_dashboard(record_dirs: Sequence[str | Path], out_dir: str | Path) -> tuple[Path, Path]:
    """Draw the results dashboard from the records in ``record_dirs`` (:func:`load_all_records`;
    the first is the chapters' folder) into ``out_dir``: ``dashboard.png`` and ``dashboard.md``,
    a MyST figure for ``{include}`` from a page beside ``out_dir``, whose caption links the
    chapters whose records it used and names the other runs."""

    matplotlib.use("Agg", force=False)


    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    bars = dashboard.gains(load_all_records(record_dirs))
    fig = plots.results_dashboard(bars)
    png = out_dir / "dashboard.png"
    with atomic_path(png) as tmp:
        fig.savefig(tmp, format="png", dpi=130)
    plt.close(fig)
    project = [b for b in bars if not b.source.startswith("paper")]
    used = sorted({r for b in project for r in b.records})
    chapters = ", ".join(f"[{r}]({r}.ipynb)" for r in used if "/" not in r)
    others = ", ".join(f"`{r}`" for r in used if "/" in r)
    real = sorted({b.source for b in project if b.source != dashboard.POCKET})
    caption = (
        "Each transfer method's gain over the student model (points on the task's metric), per paradigm "
        "(rows) and task family (columns). Grey bars are the paper's (Table 1, Llama-2-13B-chat → 7B-chat; "
        "Table 8, Qwen2.5 3B → 1.5B; code is the mean of HumanEval and MBPP); coloured bars are this "
        "project's runs, read from the records of " + (chapters or "no chapter yet (run `make book`)")
        + (f" and of {others}" if others else "") + ". "
        + (f"Real pairs with records: {', '.join(real)}. " if real else
           "No real pair has records here yet: [run it on your pair](run_your_pair.md) to add its bars. ")
        + "Error bars: spread over seeds or chapters where a method has several results. "
          "A missing bar means no record has that method on that family."
    )
    md = (f":::{{figure}} {out_dir.name}/dashboard.png\n:name: fig-dashboard\n"
          f":alt: Bar charts of each method's gain over the student, the paper's beside this project's\n"
          f":width: 100%\n\n{caption}\n:::\n")
    md_path = out_dir / "dashboard.md"
    atomic_write_text(md_path, md)
    return png, md_path


# ================================================================================ Sphinx hooks


def _config_inited(app, config) -> None:
    path = Path(app.srcdir) / config.pkt_figures
    try:
        # copied into the config so that a changed caption re-reads every chapter (rebuild="env")
        config.pkt_figure_captions = load_captions(path)
    except PktError as e:

        raise ConfigError(str(e)) from None


def _builder_inited(app) -> None:


    if app.builder.format == "html" and app.config.pkt_assets:
        problems = assets.check(Path(app.srcdir) / app.config.pkt_assets)
        if problems:
            raise ConfigError("offline assets missing: " + "; ".join(problems))
    if app.config.pkt_dashboard_doc:
        doc = Path(app.srcdir) / app.config.pkt_dashboard_doc
        write_dashboard([Path(app.srcdir) / d for d in app.config.pkt_records], doc.parent / "_generated")


def _source_read(app, docname: str, source: list[str]) -> None:
    if not str(app.env.doc2path(docname)).endswith(".ipynb"):
        return

    try:
        nb = json.loads(source[0])
    except ValueError:
        return  # not JSON (a text notebook format): myst-nb reports it
    chapter = Path(docname).name
    captions = copy.deepcopy(app.config.pkt_figure_captions.get(chapter, []))
    log = logging.getLogger(__name__)
    for w in clean_notebook(nb, chapter, captions):
        log.warning(w, type="pkt", subtype="caption", location=docname)
    source[0] = json.dumps(nb)


def _outdated(app, env, added, changed, removed) -> list[str]:
    """The page that includes the dashboard is rewritten on every build (records change)."""
    doc = app.config.pkt_dashboard_doc
    name = str(Path(doc).with_suffix("")) if doc else ""
    return [name] if name and name in env.found_docs else []


def setup(app) -> dict[str, Any]:
    app.add_config_value("pkt_figures", "book/figures.yml", "env")
    app.add_config_value("pkt_figure_captions", {}, "env")
    app.add_config_value("pkt_assets", "book/_static/npm", "html")
    app.add_config_value("pkt_records", ["book", "runs/scale"], "env")
    app.add_config_value("pkt_dashboard_doc", "book/intro.md", "env")
    app.connect("config-inited", _config_inited)
    app.connect("builder-inited", _builder_inited)
    app.connect("source-read", _source_read)
    app.connect("env-get-outdated", _outdated)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
