"""The rendered-book checker (pktlib.book.check): static link/image checks on a small fake site
made here, the browser checks on the same site when Chromium is installed, and the real
``_build/html`` when a built book exists."""
from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from pktlib.book.check import check_book, check_browser, check_static, find_chromium, main

PNG_1PX = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg==")

PAGE = """<!doctype html><html><head><title>{title}</title>
<link rel="stylesheet" href="{prefix}_static/style.css"></head>
<body><h1 id="top">{title}</h1>{body}</body></html>"""


def _site(tmp_path: Path, *, broken: bool) -> Path:
    root = tmp_path / ("broken" if broken else "clean")
    (root / "_static").mkdir(parents=True)
    (root / "_images").mkdir()
    (root / "book").mkdir()
    (root / "_static" / "style.css").write_text("body { color: black; }")
    (root / "_images" / "fig.png").write_bytes(PNG_1PX)
    (root / "_images" / "empty.png").write_bytes(b"")
    # A Jinja template that Sphinx themes leave in _static: not a page, never checked.
    (root / "_static" / "macros.html").write_text('<link href="{{ pathto(x) }}">')
    data_png = "data:image/png;base64," + base64.b64encode(PNG_1PX).decode()
    index_body = ('<p><a href="book/chapter.html#results">results</a> <a href="#top">top</a> '
                  '<a href="https://example.org/">outside</a> <img src="_images/fig.png">'
                  f'<img src="{data_png}"></p>')
    chapter_body = ('<p>Does the chapter ask its question first?</p>'
                    '<h2 id="results">Results</h2><p><a href="../index.html">home</a> costs $5 and $6.</p>'
                    # an ipywidget output whose cell also shows a static fallback
                    '<div class="cell"><div class="cell_output"><pre>IntSlider(value=3)</pre>'
                    '<script type="application/vnd.jupyter.widget-view+json">{"model_id": "ok1"}</script>'
                    '</div></div>'
                    # a captioned figure, and code that holds TeX-like text (never judged)
                    '<div class="cell"><div class="cell_input"><pre>s = "$\\frac{a}{b}$"</pre></div>'
                    '<div class="cell_output"><figure><img src="../_images/fig.png" width="200" height="100">'
                    '<figcaption><p>Fig. 1 The result. Mirrors the paper\'s Figure 3.</p></figcaption></figure>'
                    '</div></div>')
    if broken:
        index_body += ('<a href="book/missing.html">gone</a> <a href="book/chapter.html#nowhere">bad anchor</a>'
                       '<img src="_images/empty.png"> <img src="_images/absent.png">'
                       '<img src="data:image/png;base64,">')
        chapter_body += ('<script>console.error("boom from the page")</script>'
                         '<script>undefined_function_xyz()</script>'
                         '<div class="cell"><div class="cell_output">'
                         '<script type="application/vnd.jupyter.widget-view+json">{"model_id": "lonely"}</script>'
                         '</div></div>'
                         # offline failures: a CDN image, and a worker's fetch the page's own
                         # network events do not show
                         '<img src="https://cdn.example.org/lib.png" width="10" height="10">'
                         '<script>new Worker(URL.createObjectURL(new Blob(['
                         '"fetch(\'https://worker.example.com/data.json\')"])))</script>'
                         '<div class="cell"><div class="cell_output"><img src="../_images/fig.png" width="200" height="90">'
                         '<div class="output traceback"><pre>ZeroDivisionError: division by zero</pre></div>'
                         '<div class="output stderr"><pre>UserWarning: careful</pre></div>'
                         '<pre>Loading: 40%|####      | 26/64 [00:01&lt;00:02, 17.2it/s]</pre>'
                         '<p>The score is <span class="math">\\(\\log p(t)\\)</span>, '
                         'also $\\sqrt{x}$ raw.</p></div></div>'
                         '<div class="pkt-explorer" id="ex1"></div>')
        # a chapter whose first cell comes before its title
        (root / "book" / "untitled.html").write_text(
            '<!doctype html><html><body><article><div class="cell"><pre>import x</pre></div>'
            '<h1>Late title</h1><p>No question here.</p></article></body></html>')
    (root / "index.html").write_text(PAGE.format(title="Home", body=index_body, prefix=""))
    (root / "book" / "chapter.html").write_text(PAGE.format(title="Chapter", body=chapter_body, prefix="../"))
    return root


def test_static_check_clean_site(tmp_path):
    rep = check_static(_site(tmp_path, broken=False))
    assert rep.pages == 2  # _static/macros.html is not a page
    assert rep.ok, [str(p) for p in rep.problems]


def test_static_check_catches_broken_links_and_empty_images(tmp_path):
    rep = check_static(_site(tmp_path, broken=True))
    by_kind = {}
    for p in rep.problems:
        by_kind.setdefault(p.kind, []).append(p.detail)
    assert any("book/missing.html" in d for d in by_kind["broken-link"]), by_kind
    assert any("nowhere" in d for d in by_kind["broken-anchor"]), by_kind
    assert any("empty.png" in d for d in by_kind["empty-image"]), by_kind
    assert any("data URI" in d for d in by_kind["empty-image"]), by_kind
    assert any("absent.png" in d for d in by_kind["missing-image"]), by_kind
    assert len(rep.problems) == 5, [str(p) for p in rep.problems]


def test_cli_exit_codes(tmp_path, capsys):
    assert main([str(_site(tmp_path, broken=False)), "--no-browser"]) == 0
    assert main([str(_site(tmp_path, broken=True)), "--no-browser"]) == 1
    assert "broken-link" in capsys.readouterr().out
    assert main([str(tmp_path / "nothing"), "--no-browser"]) == 1


needs_chromium = pytest.mark.skipif(find_chromium() is None,
                                    reason="Chromium not installed (apt-get install chromium chromium-driver)")


@needs_chromium
def test_browser_check_on_fake_site(tmp_path):
    shots = tmp_path / "shots"
    clean = check_browser(_site(tmp_path, broken=False), progress=False, screenshots=shots)
    assert clean.ok, [str(p) for p in clean.problems] + clean.external
    # The link to example.org is only a link, never fetched: no external request.
    assert clean.external == []
    for page in ("index", "book/chapter"):
        for suffix in (".png", ".full.png"):
            png = (shots / page).with_suffix(suffix)
            assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
    rep = check_browser(_site(tmp_path, broken=True), progress=False)
    kinds = {p.kind for p in rep.problems}
    details = " | ".join(str(p) for p in rep.problems)
    assert "boom from the page" in details
    assert "undefined_function_xyz" in details
    assert "widget-no-static" in kinds and "lonely" in details
    assert "ok1" not in details  # the widget with a static fallback passes
    assert any(p.kind == "empty-image" and "empty.png" in p.detail for p in rep.problems), details
    # Both external requests are counted, the worker's too; and the report fails on them.
    assert sorted(u.split(": ", 1)[1] for u in rep.external) == [
        "https://cdn.example.org/lib.png", "https://worker.example.com:443"], rep.external
    assert not rep.ok and "2 external requests" in rep.summary()
    by_kind = {k: [p.detail for p in rep.problems if p.kind == k] for k in kinds}
    assert any("ZeroDivisionError" in d for d in by_kind["error-output"]), details
    assert any("UserWarning" in d for d in by_kind["stderr-output"]), details
    assert any("26/64" in d for d in by_kind["progress-bar"]), details
    assert any("log p(t)" in d for d in by_kind["raw-latex"]), details  # the untypeset .math span
    assert any("sqrt" in d for d in by_kind["raw-latex"]), details  # TeX left in the text
    assert not any("frac" in d for d in by_kind["raw-latex"]), details  # TeX inside code is fine
    assert by_kind["figure-no-caption"] and not any("$5" in d for d in details.split("|"))
    assert by_kind["explorer-not-drawn"] == ["neuron explorer ex1 was not drawn"]
    assert [p.page for p in rep.problems if p.kind == "title-not-first"] == ["book/untitled.html"]


def test_page_problems_rules():
    from pktlib.book.check import page_problems

    good = {"n_figures": 2, "is_chapter": True, "has_title": True, "cells_before_title": 0,
            "opening": "How far does LaTen move the student?"}
    assert page_problems("p", good, expected_figures=2) == []
    assert page_problems("p", {**good, "n_figures": 1}, expected_figures=2)[0].kind == "missing-figure"
    assert page_problems("p", {**good, "opening": "LaTen, described."})[0].kind == "no-question"
    assert page_problems("p", {**good, "cells_before_title": 2})[0].kind == "title-not-first"
    assert page_problems("p", {**good, "has_title": False})[0].kind == "title-not-first"
    # pages that are not chapters (no notebook cells) are not asked for a question
    assert page_problems("p", {"is_chapter": False, "opening": ""}) == []


def test_expected_figures_reads_the_source_notebook(tmp_path):
    from pktlib.book.check import expected_figures

    (tmp_path / "_sources" / "book").mkdir(parents=True)
    nb = {"cells": [{"cell_type": "markdown", "source": "# T"},
                    {"cell_type": "code", "outputs": [{"output_type": "display_data", "data": {"image/png": "x", "text/plain": "F"}},
                                                      {"output_type": "stream", "text": "hi"}]},
                    {"cell_type": "code", "outputs": [{"output_type": "execute_result", "data": {"text/plain": "1"}}]},
                    {"cell_type": "code", "outputs": [{"output_type": "display_data", "data": {"image/svg+xml": "<svg/>"}}]}]}
    (tmp_path / "_sources" / "book" / "ch.ipynb").write_text(json.dumps(nb))
    assert expected_figures(tmp_path, tmp_path / "book" / "ch.html") == 2
    assert expected_figures(tmp_path, tmp_path / "book" / "other.html") is None


VENDOR = Path(__file__).resolve().parents[1] / "book" / "_static" / "npm"


@needs_chromium
@pytest.mark.skipif(not (VENDOR / "mathjax" / "tex-mml-chtml.js").is_file(),
                    reason="offline assets not installed (make assets)")
def test_offline_mathjax_typesets_without_network(tmp_path):
    """The book's MathJax set-up (_config.yml): the vendored copy, fonts from beside it."""
    import shutil

    import yaml

    cfg = yaml.safe_load((Path(__file__).resolve().parents[1] / "_config.yml").read_text())["sphinx"]["config"]
    (tmp_path / "_static").mkdir()
    shutil.copytree(VENDOR / "mathjax", tmp_path / "_static" / "npm" / "mathjax")
    shutil.copytree(VENDOR / "@mathjax", tmp_path / "_static" / "npm" / "@mathjax")
    (tmp_path / "index.html").write_text(
        f"<html><head><script>window.MathJax = {json.dumps(cfg['mathjax3_config'])};</script>"
        f'<script defer src="_static/{cfg["mathjax_path"]}"></script></head><body><article><h1>Maths</h1>'
        '<p>Inline <span class="math notranslate nohighlight">\\(\\log p(t \\mid r_l + c_i w_i)\\)</span>.</p>'
        '<div class="math notranslate nohighlight">\\[\\frac{a}{b} = \\sqrt{\\mathrm{mean}(h_L^2)}\\]</div>'
        "</article></body></html>")
    rep = check_browser(tmp_path, progress=False)
    assert rep.ok, [str(p) for p in rep.problems] + rep.external


BUILT = Path(__file__).resolve().parents[1] / "_build" / "html"


@needs_chromium
@pytest.mark.skipif(not (BUILT / "index.html").is_file(), reason="no built book in _build/html (run `make html`)")
def test_built_book_renders():
    rep = check_book(BUILT, progress=False)
    assert rep.ok, rep.summary() + "\n" + "\n".join(str(p) for p in rep.problems)


def test_sphinx_fix_drops_duplicate_inline_scripts():
    from sphinx.builders.html._assets import _JavaScript

    from pktlib.book.sphinx_fixes import dedupe_scripts

    body = 'const THEBE_JS_URL = "x"'
    scripts = [_JavaScript("_static/a.js"), _JavaScript(None, body=body), _JavaScript("_static/b.js"),
               _JavaScript("", body=body), _JavaScript("", body="var other = 1")]
    ctx = {"script_files": scripts}
    dedupe_scripts(None, "page", "page.html", ctx, None)
    assert [getattr(s, "filename", None) or "" for s in ctx["script_files"]] == ["_static/a.js", "", "_static/b.js", ""]
    assert ctx["script_files"] is scripts  # edited in place
