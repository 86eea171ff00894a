"""The rendered-book checker (pktlib.bookcheck): static link/image checks on a small fake site
made here, the browser checks on the same site when Chromium is installed, and the real
``_build/html`` when a built book exists."""
from __future__ import annotations

import base64
from pathlib import Path

import pytest

from pktlib.bookcheck import check_book, check_browser, check_static, find_chromium, main

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
    chapter_body = ('<h2 id="results">Results</h2><p><a href="../index.html">home</a></p>'
                    # an ipywidget output whose cell also shows a static fallback
                    '<div class="cell"><div class="cell_output"><pre>IntSlider(value=3)</pre>'
                    '<script type="application/vnd.jupyter.widget-view+json">{"model_id": "ok1"}</script>'
                    '</div></div>')
    if broken:
        index_body += ('<a href="book/missing.html">gone</a> <a href="book/chapter.html#nowhere">bad anchor</a>'
                       '<img src="_images/empty.png"> <img src="_images/absent.png">'
                       '<img src="data:image/png;base64,">')
        chapter_body += ('<script>console.error("boom from the page")</script>'
                         '<script>undefined_function_xyz()</script>'
                         '<div class="cell"><div class="cell_output">'
                         '<script type="application/vnd.jupyter.widget-view+json">{"model_id": "lonely"}</script>'
                         '</div></div>')
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
    clean = check_browser(_site(tmp_path, broken=False), progress=False)
    assert clean.ok, [str(p) for p in clean.problems]
    # The link to example.org cannot load offline but it is only a link, never fetched.
    rep = check_browser(_site(tmp_path, broken=True), progress=False)
    kinds = {p.kind for p in rep.problems}
    details = " | ".join(str(p) for p in rep.problems)
    assert "boom from the page" in details
    assert "undefined_function_xyz" in details
    assert "widget-no-static" in kinds and "lonely" in details
    assert "ok1" not in details  # the widget with a static fallback passes
    assert any(p.kind == "empty-image" and "empty.png" in p.detail for p in rep.problems), details


BUILT = Path(__file__).resolve().parents[1] / "_build" / "html"


@needs_chromium
@pytest.mark.skipif(not (BUILT / "index.html").is_file(), reason="no built book in _build/html (run `make html`)")
def test_built_book_renders():
    rep = check_book(BUILT, progress=False)
    assert rep.ok, rep.summary() + "\n" + "\n".join(str(p) for p in rep.problems)


def test_sphinx_fix_drops_duplicate_inline_scripts():
    from sphinx.builders.html._assets import _JavaScript

    from pktlib.sphinx_fixes import dedupe_scripts

    body = 'const THEBE_JS_URL = "x"'
    scripts = [_JavaScript("_static/a.js"), _JavaScript(None, body=body), _JavaScript("_static/b.js"),
               _JavaScript("", body=body), _JavaScript("", body="var other = 1")]
    ctx = {"script_files": scripts}
    dedupe_scripts(None, "page", "page.html", ctx, None)
    assert [getattr(s, "filename", None) or "" for s in ctx["script_files"]] == ["_static/a.js", "", "_static/b.js", ""]
    assert ctx["script_files"] is scripts  # edited in place
