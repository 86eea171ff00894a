"""Checking the rendered book: ``python -m pktlib.book.check _build/html``.

Two layers of checks over a built HTML site:

* **static** (pure Python, :func:`check_static`): every internal link (``<a href>``,
  ``<link href>``, ``<script src>``, ``<img src>``, ``<source src>``) resolves to a file of the
  site (and, for ``page.html#anchor``, to an element with that id); every image is present and
  non-empty (files and ``data:`` URIs alike);
* **browser** (headless Chromium over the DevTools protocol, :func:`check_browser`): every page
  is loaded from a local HTTP server, MathJax is given time to typeset, a screenshot of the page
  is saved, and the page is examined (:data:`_PAGE_PROBE`, :func:`page_problems`):

  - no console errors, no uncaught exceptions, no failed loads;
  - **no external request**: the book is read offline, so every request must go to the local
    server. The pages are opened in a browser context whose proxy is a logging proxy of ours
    that refuses everything (loopback, the site, is never proxied), so requests from workers,
    fonts and CSS imports are counted too, not only those the DevTools ``Network`` events of the
    page show; the browser's own background traffic (update checks) is outside that context
    and not counted. Any external request fails the check;
  - figures: every image decodes; a chapter whose notebook has figure outputs shows as many
    rendered figures (visible, decoded, at least 50 px), and each carries a caption;
  - no raw LaTeX: every ``.math`` element was typeset, and no TeX delimiters or commands are
    left in the visible text outside code;
  - no error output (tracebacks), no stderr output, no progress bars;
  - a chapter opens with its title (no code cell before the ``h1``) and its opening paragraph
    asks the question the chapter answers (a ``?``);
  - every ipywidget output degrades to a static view, and every neuron explorer was drawn.

Chromium is started with a fresh profile and no background networking (Debian packages
``chromium`` and ``chromium-driver``; only the ``chromium`` binary is used).
"""
from __future__ import annotations

import argparse
import base64
import binascii
import functools
import json
import os
import re
import sys
import time
from dataclasses import dataclass, field
from html.parser import HTMLParser
from importlib import resources
from pathlib import Path
from typing import Any, Mapping
from urllib.parse import unquote, urlsplit

from tqdm.auto import tqdm

from pktlib.book.chromium import (CDP, CHROMIUM_FLAGS, VIEWPORT, RefusingProxy, find_chromium, launch_chromium, refusing_proxy,
                                  screenshot, serve, set_viewport)
from pktlib.errors import PktError

WIDGET_MIME = "application/vnd.jupyter.widget-view+json"

__all__ = ["Problem", "Report", "check_static", "check_browser", "check_book", "find_chromium",
           "page_problems", "expected_figures", "CHROMIUM_FLAGS", "main"]


@dataclass(frozen=True)
class Problem:
    """One finding: ``kind`` is broken-link, broken-anchor, missing-image, empty-image,
    console-error, exception, failed-load, external-request, missing-figure,
    figure-no-caption, raw-latex, error-output, stderr-output, progress-bar, title-not-first,
    no-question, widget-no-static or explorer-not-drawn."""

    page: str
    kind: str
    detail: str

    def __str__(self) -> str:
        return f"{self.page}: {self.kind}: {self.detail}"


@dataclass
class Report:
    pages: int = 0
    problems: list[Problem] = field(default_factory=list)
    external: list[str] = field(default_factory=list)  # "page: url" of every external request
    screenshots: list[str] = field(default_factory=list)
    browser: bool = False

    @property
    def ok(self) -> bool:
        return not self.problems and not self.external

    def summary(self) -> str:
        kinds: dict[str, int] = {}
        for p in self.problems:
            kinds[p.kind] = kinds.get(p.kind, 0) + 1
        how = "static + headless Chromium" if self.browser else "static only"
        head = (f"checked {self.pages} pages ({how}): {len(self.external)} external requests, "
                f"{len(self.problems)} problems" + (f" {kinds}" if kinds else ""))
        if self.screenshots:
            head += f"; {len(self.screenshots)} screenshots in {os.path.commonpath(self.screenshots)}"
        return head


# ================================================================================ static checks


class _Collector(HTMLParser):
    """Links, image sources and element ids of one HTML page."""

    LINK_ATTRS = {"a": "href", "link": "href", "script": "src", "img": "src", "source": "src",
                  "iframe": "src"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.links: list[tuple[str, str]] = []  # (tag, url)
        self.ids: set[str] = set()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        for key in ("id", "name"):
            if a.get(key):
                self.ids.add(a[key])  # type: ignore[arg-type]
        attr = self.LINK_ATTRS.get(tag)
        if attr and a.get(attr) is not None:
            self.links.append((tag, a[attr]))  # type: ignore[arg-type]
        if tag == "img" and a.get("srcset"):
            for part in a["srcset"].split(","):  # type: ignore[union-attr]
                if part.strip():
                    self.links.append(("img", part.strip().split()[0]))

    handle_startendtag = handle_starttag


@functools.lru_cache(maxsize=None)
def _parse(path: Path) -> _Collector:
    c = _Collector()
    c.feed(path.read_text(encoding="utf-8", errors="replace"))
    return c


def _is_internal(url: str) -> bool:
    parts = urlsplit(url)
    return not parts.scheme and not parts.netloc


def _data_uri_payload(url: str) -> bytes | None:
    """Decoded bytes of a ``data:`` URI (None when malformed)."""
    head, _, body = url.partition(",")
    try:
        return base64.b64decode(body, validate=False) if head.endswith(";base64") else unquote(body).encode()
    except (binascii.Error, ValueError):
        return None


def _resolve(root: Path, page: Path, path: str) -> Path:
    target = (root / path.lstrip("/")) if path.startswith("/") else (page.parent / path)
    target = Path(os.path.normpath(target))
    return target / "index.html" if target.is_dir() else target


# Folders of a Sphinx build that hold assets, not pages (_static also holds Jinja templates
# named *.html that are never served as pages); hidden folders are never part of the site.
NON_PAGE_DIRS = frozenset({"_static", "_sources", "_images", "_downloads", "_sphinx_design_static"})


def html_pages(root: str | os.PathLike) -> list[Path]:
    """The site's pages: every ``*.html`` outside asset and hidden folders."""
    root = Path(root)
    out = []
    for p in root.rglob("*.html"):
        parts = p.relative_to(root).parts[:-1]
        if p.is_file() and not any(d in NON_PAGE_DIRS or d.startswith(".") for d in parts):
            out.append(p)
    return sorted(out)


def check_static(root: str | os.PathLike, *, anchors: bool = True) -> Report:
    """Broken internal links/anchors and missing or empty images in every page under ``root``."""
    root = Path(root).resolve()
    pages = html_pages(root)
    rep = Report(pages=len(pages))
    _parse.cache_clear()
    for page in pages:
        rel = str(page.relative_to(root))
        col = _parse(page)
        for tag, url in col.links:
            url = url.strip()
            if tag == "img" and url.startswith("data:"):
                payload = _data_uri_payload(url)
                if not payload:
                    rep.problems.append(Problem(rel, "empty-image", f"data URI with no content ({url[:40]}...)"))
                continue
            if not url or not _is_internal(url) or url.startswith(("#", "javascript:")) and tag != "a":
                continue
            parts = urlsplit(url)
            if not parts.path:  # "#anchor" on the same page
                if anchors and tag == "a" and parts.fragment and unquote(parts.fragment) not in col.ids:
                    rep.problems.append(Problem(rel, "broken-anchor", f"#{parts.fragment} (no such id on the page)"))
                continue
            target = _resolve(root, page, unquote(parts.path))
            if not target.is_file():
                kind = "missing-image" if tag == "img" else "broken-link"
                rep.problems.append(Problem(rel, kind, f"<{tag}> {url} -> {target.relative_to(root) if target.is_relative_to(root) else target} does not exist"))
                continue
            if tag == "img" and target.stat().st_size == 0:
                rep.problems.append(Problem(rel, "empty-image", f"{url} is an empty file"))
            if (anchors and tag == "a" and parts.fragment and target.suffix == ".html"
                    and unquote(parts.fragment) not in _parse(target).ids):
                rep.problems.append(Problem(rel, "broken-anchor", f"{url} (no id {parts.fragment!r} in {target.name})"))
    return rep


# ================================================================================ browser checks


# The page-side probes (JavaScript): MathJax readiness, then what the page shows (pktlib/book/probes.js).
_MATHJAX_READY, _PAGE_PROBE = (resources.files("pktlib.book").joinpath("probes.js").read_text(encoding="utf-8")
                               .replace("__WIDGET_MIME__", WIDGET_MIME).split("\n//== PAGE_PROBE ==\n"))


def page_problems(page: str, probe: Mapping[str, Any], expected_figures: int | None = None) -> list[Problem]:
    """Judge one page from its probe (the dict :data:`_PAGE_PROBE` returns): figures, raw LaTeX,
    error and noisy outputs, the chapter's opening, widgets and explorers.

    ``expected_figures`` is the number of figure outputs in the page's source notebook (None
    when unknown): the page must show at least as many rendered figures."""
    out = []

    def add(kind: str, detail: str) -> None:
        out.append(Problem(page, kind, detail))

    for src in probe.get("bad_images", []):
        add("empty-image", f"image does not decode in the browser: {src}")
    n = int(probe.get("n_figures", 0))
    if expected_figures and n < expected_figures:
        add("missing-figure", f"{n} rendered figures, but the notebook has {expected_figures} figure outputs")
    for src in probe.get("uncaptioned", []):
        add("figure-no-caption", f"figure {src} has no caption")
    for t in probe.get("untypeset", []):
        add("raw-latex", f"math not typeset: {t!r}")
    for t in probe.get("tex_text", []):
        add("raw-latex", f"TeX in the text: {t!r}")
    for t in probe.get("tracebacks", []):
        add("error-output", t)
    for t in probe.get("stderr", []):
        add("stderr-output", t)
    for t in probe.get("progress", []):
        add("progress-bar", t)
    if probe.get("is_chapter"):
        if not probe.get("has_title"):
            add("title-not-first", "the chapter has no title (h1)")
        elif probe.get("cells_before_title"):
            add("title-not-first", f"{probe['cells_before_title']} code cells before the title")
        elif "?" not in probe.get("opening", ""):
            add("no-question", "the opening paragraphs ask no question: " + repr(probe.get("opening", "")[:80]))
    for wid in probe.get("no_static", []):
        add("widget-no-static", f"widget {wid} shows nothing without its JavaScript")
    for e in probe.get("explorers_not_drawn", []):
        add("explorer-not-drawn", f"neuron explorer {e} was not drawn")
    return out


def _classify(ev: dict) -> tuple[str, str, str] | None:
    """(kind, detail, url) of an error event, or None when it is not an error."""
    m, p = ev["method"], ev.get("params", {})
    if m == "Runtime.exceptionThrown":
        d = p.get("exceptionDetails", {})
        desc = (d.get("exception") or {}).get("description") or d.get("text", "")
        url = d.get("url") or ""
        frames = (d.get("stackTrace") or {}).get("callFrames") or []
        if frames and not url:
            url = frames[0].get("url", "")
        return "exception", desc.splitlines()[0] if desc else "uncaught exception", url
    if m == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
        args = " ".join(str(a.get("value", a.get("description", ""))) for a in p.get("args", []))
        frames = (p.get("stackTrace") or {}).get("callFrames") or []
        return "console-error", args[:300], frames[0].get("url", "") if frames else ""
    if m == "Log.entryAdded" and p.get("entry", {}).get("level") == "error":
        e = p["entry"]
        return "console-error", e.get("text", "")[:300], e.get("url", "")
    if m == "Network.loadingFailed" and not p.get("canceled"):
        return "failed-load", p.get("errorText", ""), p.get("_url", "")
    return None


def _is_local(url: str, base: str) -> bool:
    return url.startswith((base + "/", "data:", "blob:", "about:")) or url == base


def expected_figures(root: Path, page: Path) -> int | None:
    """Figure outputs in the source notebook of ``page`` (Sphinx's copy in ``_sources``), or
    None when the page does not come from a notebook."""
    rel = page.relative_to(root).with_suffix(".ipynb")
    for cand in (root / "_sources" / rel, root / "_sources" / f"{rel}.txt"):
        if cand.is_file():
            try:
                nb = json.loads(cand.read_text(encoding="utf-8"))
            except ValueError:
                return None
            return sum(1 for c in nb.get("cells", []) if c.get("cell_type") == "code"
                       for o in c.get("outputs", [])
                       if any(k.startswith("image/") for k in (o.get("data") or {})))
    return None


_REFRESH = re.compile(r"""<meta\s+http-equiv=["']?refresh""", re.I)


def _is_redirect(page: Path) -> bool:
    """A page that only sends the browser elsewhere (``<meta http-equiv="refresh">``)."""
    with open(page, encoding="utf-8", errors="replace") as fh:
        return bool(_REFRESH.search(fh.read(4096)))


def _check_page(cdp: CDP, target: str, rel: str, url: str, base: str, proxy: RefusingProxy, rep: Report, *,
                settle_s: float, page_timeout_s: float, expected: int | None, shots: Path | None) -> None:
    """Load one page in its own tab and add what is wrong with it to ``rep``."""
    sess = cdp.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
    for dom in ("Runtime", "Log", "Network", "Page"):
        cdp.call(f"{dom}.enable", session=sess)
    set_viewport(cdp, sess, VIEWPORT[1])
    cdp.events.clear()
    with proxy.lock:
        proxy.log.clear()
    cdp.call("Page.navigate", {"url": url}, session=sess)
    deadline = time.monotonic() + page_timeout_s
    loaded = False
    while time.monotonic() < deadline and not loaded:
        cdp.pump(0.1)
        loaded = any(e["method"] == "Page.loadEventFired" and e.get("sessionId") == sess for e in cdp.events)
    if not loaded:
        rep.problems.append(Problem(rel, "failed-load", f"no load event within {page_timeout_s:.0f} s"))
    cdp.pump(settle_s)  # late scripts (widget managers) report after load
    mj = cdp.call("Runtime.evaluate", {"expression": _MATHJAX_READY, "awaitPromise": True, "returnByValue": True},
                  session=sess, timeout=120)["result"].get("value")
    if mj in ("timeout", "not-started"):
        rep.problems.append(Problem(rel, "raw-latex", f"MathJax did not finish typesetting ({mj})"))
    cdp.pump(settle_s)
    probe = cdp.call("Runtime.evaluate", {"expression": _PAGE_PROBE, "returnByValue": True},
                     session=sess, timeout=120)["result"].get("value") or {}
    rep.problems += page_problems(rel, probe, expected)
    if shots is not None:
        for suffix, full in ((".png", False), (".full.png", True)):
            screenshot(cdp, sess, shots / Path(rel).with_suffix(suffix), full=full)
            rep.screenshots.append(str(shots / Path(rel).with_suffix(suffix)))
    cdp.pump(0.2)
    urls = {e["params"]["requestId"]: e["params"]["request"]["url"]
            for e in cdp.events if e["method"] == "Network.requestWillBeSent"}
    external = {u for u in urls.values() if not _is_local(u, base)}
    with proxy.lock:
        proxied = {u for _, u in proxy.log}
        proxy.log.clear()
    # A tunnel (CONNECT host:443) names only the host: it is the same request as a URL of that
    # host the page's events show; one the events do not show is counted.
    hosts = {urlsplit(u).hostname for u in external}
    external |= {u for u in proxied if u not in external
                 and not (u.startswith("https://") and urlsplit(u).hostname in hosts)}
    rep.external += [f"{rel}: {u}" for u in sorted(external)]
    seen: set[tuple[str, str]] = set()
    for ev in cdp.events:
        if ev.get("sessionId") != sess:
            continue
        if ev["method"] == "Network.loadingFailed":
            ev["params"]["_url"] = urls.get(ev["params"].get("requestId"), "")
        c = _classify(ev)
        if c is None:
            continue
        kind, detail, where = c
        if where == f"{base}/favicon.ico" or (where and not _is_local(where, base)):
            continue  # the browser's own favicon request; external ones are counted above
        key = (kind, detail + where)
        if key not in seen:
            seen.add(key)
            rep.problems.append(Problem(rel, kind, f"{detail} [{where}]" if where else detail))


def check_browser(root: str | os.PathLike, *, chromium: str | None = None, settle_s: float = 0.5,
                  page_timeout_s: float = 30.0, screenshots: str | os.PathLike | None = None,
                  progress: bool = True) -> Report:
    """Load every page under ``root`` in headless Chromium (served over local HTTP), judge it
    (:func:`page_problems`), count its external requests and, if ``screenshots`` is a folder,
    save ``<page>.png`` (the first screen) and ``<page>.full.png`` (the whole page) there."""
    from websockets.sync.client import connect

    root = Path(root).resolve()
    binary = chromium or find_chromium()
    if binary is None:
        raise PktError("Chromium not found: install the Debian packages chromium and chromium-driver")
    pages = html_pages(root)
    rep = Report(pages=len(pages), browser=True)
    shots = Path(screenshots) if screenshots else None
    with (serve(root) as base, refusing_proxy() as proxy, launch_chromium(binary) as ws_url,
          connect(ws_url, max_size=None, open_timeout=30) as ws):
        cdp = CDP(ws)
        # The pages' own context: its proxy sees every non-loopback request of the pages and
        # their workers, and none of the browser's background traffic.
        context = cdp.call("Target.createBrowserContext",
                           {"proxyServer": f"http://127.0.0.1:{proxy.server_address[1]}"})["browserContextId"]
        it = pages
        if progress:

            it = tqdm(pages, desc="pages", file=sys.stderr)
        for page in it:
            rel = page.relative_to(root).as_posix()
            if _is_redirect(page):
                continue  # a redirect (index.html -> the root page): its target is checked itself
            target = cdp.call("Target.createTarget", {"url": "about:blank", "browserContextId": context})["targetId"]
            try:
                _check_page(cdp, target, rel, f"{base}/{rel}", base, proxy, rep, settle_s=settle_s,
                            page_timeout_s=page_timeout_s, expected=expected_figures(root, page),
                            shots=shots)
            except PktError as e:  # a page that hangs the browser is a problem of that page
                rep.problems.append(Problem(rel, "failed-load", str(e)))
            finally:
                cdp.call("Target.closeTarget", {"targetId": target})
    return rep


def check_book(root: str | os.PathLike, *, browser: bool = True, screenshots: str | os.PathLike | None = None,
               progress: bool = True) -> Report:
    """Static checks, then (if ``browser``) the browser checks."""
    root = Path(root)
    if not (root / "index.html").is_file() and not html_pages(root):
        raise PktError(f"no built book at {root} (run `make html` first)")
    rep = check_static(root)
    if browser:
        b = check_browser(root, screenshots=screenshots, progress=progress)
        rep.problems += b.problems
        rep.external += b.external
        rep.screenshots = b.screenshots
        rep.browser = True
    return rep


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pktlib.book.check", description=__doc__.splitlines()[0])
    ap.add_argument("root", nargs="?", default="_build/html", help="built HTML book (default _build/html)")
    ap.add_argument("--no-browser", action="store_true", help="static link/image checks only")
    ap.add_argument("--screenshots", metavar="DIR", help="save a screenshot of every page in DIR")
    args = ap.parse_args(argv)
    try:
        rep = check_book(args.root, browser=not args.no_browser, screenshots=args.screenshots)
    except PktError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for p in rep.problems:
        print(p)
    for u in rep.external:
        print(f"external request: {u}")
    print(rep.summary())
    return 0 if rep.ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
