"""Checking the rendered book: ``python -m pktlib.bookcheck _build/html``.

Two layers of checks over a built HTML site:

* **static** (pure Python, :func:`check_static`): every internal link (``<a href>``,
  ``<link href>``, ``<script src>``, ``<img src>``, ``<source src>``) resolves to a file of the
  site (and, for ``page.html#anchor``, to an element with that id); every image is present and
  non-empty (files and ``data:`` URIs alike);
* **browser** (headless Chromium over the DevTools protocol, :func:`check_browser`): every page
  loads from a local HTTP server with no console errors and no uncaught exceptions, every image
  decodes (``naturalWidth > 0``), and every ipywidget output degrades to a static view: either
  the widget rendered or its output cell still shows static content (text or an image).

The machine that builds the book is offline, so resources the theme fetches from the internet
(MathJax, require.js, the widget manager from a CDN) cannot load. Their failures, and errors
raised from inside such scripts, are reported separately as ``external`` and do not fail the
check unless ``--strict-external``; everything served by the site itself must be clean.

Chromium is started with a fresh profile and no background networking (Debian packages
``chromium`` and ``chromium-driver``; only the ``chromium`` binary is used).
"""
from __future__ import annotations

import argparse
import base64
import binascii
import contextlib
import functools
import http.server
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import Iterator
from urllib.parse import unquote, urlsplit

from pktlib.errors import PktError

__all__ = ["Problem", "Report", "check_static", "check_browser", "check_book", "find_chromium",
           "CHROMIUM_FLAGS", "main"]

# The flags the project uses everywhere for headless Chromium (ENV-NOTES.md); the host resolver
# rule makes every non-local host fail at once instead of waiting for DNS on an offline machine.
CHROMIUM_FLAGS: tuple[str, ...] = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage", "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
)

WIDGET_MIME = "application/vnd.jupyter.widget-view+json"


@dataclass(frozen=True)
class Problem:
    """One finding: ``kind`` is broken-link, broken-anchor, missing-image, empty-image,
    console-error, exception, failed-load, widget-no-static or external."""

    page: str
    kind: str
    detail: str

    def __str__(self) -> str:
        return f"{self.page}: {self.kind}: {self.detail}"


@dataclass
class Report:
    pages: int = 0
    problems: list[Problem] = field(default_factory=list)
    external: list[Problem] = field(default_factory=list)  # offline-only failures, informative
    browser: bool = False

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        kinds: dict[str, int] = {}
        for p in self.problems:
            kinds[p.kind] = kinds.get(p.kind, 0) + 1
        how = "static + headless Chromium" if self.browser else "static only"
        head = (f"checked {self.pages} pages ({how}): {len(self.problems)} problems"
                + (f" {kinds}" if kinds else "") + f", {len(self.external)} external (offline) failures")
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


def find_chromium() -> str | None:
    """Path of a Chromium binary (``$CHROMIUM`` first), or None."""
    for cand in (os.environ.get("CHROMIUM"), "chromium", "chromium-browser", "google-chrome"):
        if cand and shutil.which(cand):
            return shutil.which(cand)
    return None


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:  # the report says what failed; no access log
        pass


@contextlib.contextmanager
def _serve(root: Path) -> Iterator[str]:
    handler = functools.partial(_QuietHandler, directory=str(root))
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}"
    finally:
        srv.shutdown()
        srv.server_close()


@contextlib.contextmanager
def _chromium(binary: str, timeout: float = 60.0) -> Iterator[str]:
    """Start headless Chromium with a fresh profile; yield its browser DevTools websocket URL."""
    profile = tempfile.mkdtemp(prefix="pkt-chromium-")
    cmd = [binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--remote-debugging-port=0",
           "--remote-allow-origins=*", "about:blank"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        ws_url, seen, t0 = None, [], time.monotonic()
        assert proc.stderr is not None
        while time.monotonic() - t0 < timeout:
            line = proc.stderr.readline()
            if not line:
                if proc.poll() is not None:
                    break
                continue
            seen.append(line.rstrip())
            m = re.search(r"DevTools listening on (ws://\S+)", line)
            if m:
                ws_url = m.group(1)
                break
        if ws_url is None:
            raise PktError(f"Chromium did not start ({binary}): {' | '.join(seen[-3:]) or 'no output'}")
        # Keep draining stderr so Chromium never blocks on a full pipe.
        threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True).start()
        yield ws_url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(profile, ignore_errors=True)


class _CDP:
    """A minimal DevTools-protocol client over one browser websocket (flattened sessions)."""

    def __init__(self, ws) -> None:
        self.ws, self.next_id = ws, 0
        self.events: list[dict] = []

    def call(self, method: str, params: dict | None = None, session: str | None = None,
             timeout: float = 30.0) -> dict:
        self.next_id += 1
        msg = {"id": self.next_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        self.ws.send(json.dumps(msg))
        deadline = time.monotonic() + timeout
        while True:
            data = json.loads(self.ws.recv(timeout=max(0.01, deadline - time.monotonic())))
            if data.get("id") == self.next_id:
                if "error" in data:
                    raise PktError(f"DevTools {method} failed: {data['error']}")
                return data.get("result", {})
            if "method" in data:
                self.events.append(data)

    def pump(self, seconds: float) -> None:
        """Collect events for ``seconds``."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            try:
                data = json.loads(self.ws.recv(timeout=left))
            except TimeoutError:
                return
            if "method" in data:
                self.events.append(data)


# Runs in the page after load: images that did not decode, and widget outputs with neither a
# rendered widget nor any static content in their cell.
_PAGE_PROBE = r"""
(() => {
  const bad_images = [...document.images]
    .filter(im => !(im.complete && im.naturalWidth > 0))
    .map(im => im.getAttribute('src') ? im.getAttribute('src').slice(0, 120) : '(no src)');
  const widgets = [...document.querySelectorAll('script[type="%s"]')];
  const no_static = [];
  for (const s of widgets) {
    // The whole notebook cell: a static view may be another output of the same cell.
    const cell = s.closest('.cell') || s.closest('.cell_output') || s.parentElement;
    const rendered = cell.querySelector('.jupyter-widgets, .widget-area, .lm-Widget, .p-Widget');
    const clone = cell.cloneNode(true);
    clone.querySelectorAll('script, style, .cell_input, .highlight, button.copybtn').forEach(e => e.remove());
    const text = (clone.innerText || clone.textContent || '').trim();
    const img = clone.querySelector('img, svg');
    if (!rendered && !text && !img) {
      let model = '';
      try { model = JSON.parse(s.textContent).model_id || ''; } catch (e) {}
      no_static.push(model || s.textContent.slice(0, 60));
    }
  }
  return {bad_images, widgets: widgets.length, no_static};
})()
""" % WIDGET_MIME


def _classify(ev: dict, base: str) -> tuple[str, str, str] | None:
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


def check_browser(root: str | os.PathLike, *, chromium: str | None = None, settle_s: float = 0.5,
                  page_timeout_s: float = 20.0, strict_external: bool = False,
                  progress: bool = True) -> Report:
    """Load every page under ``root`` in headless Chromium (served over local HTTP)."""
    from websockets.sync.client import connect

    root = Path(root).resolve()
    binary = chromium or find_chromium()
    if binary is None:
        raise PktError("Chromium not found: install the Debian packages chromium and chromium-driver")
    pages = html_pages(root)
    rep = Report(pages=len(pages), browser=True)
    with _serve(root) as base, _chromium(binary) as ws_url, connect(ws_url, max_size=None, open_timeout=30) as ws:
        cdp = _CDP(ws)
        it = pages
        if progress:
            from tqdm.auto import tqdm

            it = tqdm(pages, desc="pages", file=sys.stderr)
        for page in it:
            rel = page.relative_to(root).as_posix()
            target = cdp.call("Target.createTarget", {"url": "about:blank"})["targetId"]
            sess = cdp.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
            for dom in ("Runtime", "Log", "Network", "Page"):
                cdp.call(f"{dom}.enable", session=sess)
            cdp.events.clear()
            cdp.call("Page.navigate", {"url": f"{base}/{rel}"}, session=sess)
            deadline = time.monotonic() + page_timeout_s
            loaded = False
            while time.monotonic() < deadline and not loaded:
                cdp.pump(0.1)
                loaded = any(e["method"] == "Page.loadEventFired" and e.get("sessionId") == sess for e in cdp.events)
            if not loaded:
                rep.problems.append(Problem(rel, "failed-load", f"no load event within {page_timeout_s:.0f} s"))
            cdp.pump(settle_s)  # late scripts (widget managers, MathJax) report after load
            probe = cdp.call("Runtime.evaluate", {"expression": _PAGE_PROBE, "returnByValue": True},
                             session=sess)["result"].get("value") or {}
            urls = {e["params"]["requestId"]: e["params"]["request"]["url"]
                    for e in cdp.events if e["method"] == "Network.requestWillBeSent"}
            seen: set[tuple[str, str]] = set()
            for ev in cdp.events:
                if ev.get("sessionId") != sess:
                    continue
                if ev["method"] == "Network.loadingFailed":
                    ev["params"]["_url"] = urls.get(ev["params"].get("requestId"), "")
                c = _classify(ev, base)
                if c is None:
                    continue
                kind, detail, url = c
                if url == f"{base}/favicon.ico":  # requested by the browser itself, not by the page
                    continue
                key = (kind, detail + url)
                if key in seen:
                    continue
                seen.add(key)
                where = f"{detail} [{url}]" if url else detail
                internal = (not url) or url.startswith(base) or url.startswith(("about:", "data:"))
                (rep.problems if internal or strict_external else rep.external).append(
                    Problem(rel, kind if internal else "external", where))
            for src in probe.get("bad_images", []):
                rep.problems.append(Problem(rel, "empty-image", f"image does not decode in the browser: {src}"))
            for wid in probe.get("no_static", []):
                rep.problems.append(Problem(rel, "widget-no-static", f"widget {wid} shows nothing without its JavaScript"))
            cdp.call("Target.closeTarget", {"targetId": target})
    return rep


def check_book(root: str | os.PathLike, *, browser: bool = True, strict_external: bool = False,
               progress: bool = True) -> Report:
    """Static checks, then (if ``browser`` and Chromium is installed) the browser checks."""
    root = Path(root)
    if not (root / "index.html").is_file() and not html_pages(root):
        raise PktError(f"no built book at {root} (run `make html` first)")
    rep = check_static(root)
    if browser:
        b = check_browser(root, strict_external=strict_external, progress=progress)
        rep.problems += b.problems
        rep.external += b.external
        rep.browser = True
    return rep


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pktlib.bookcheck", description=__doc__.splitlines()[0])
    ap.add_argument("root", nargs="?", default="_build/html", help="built HTML book (default _build/html)")
    ap.add_argument("--no-browser", action="store_true", help="static link/image checks only")
    ap.add_argument("--strict-external", action="store_true",
                    help="also fail on resources from other hosts (CDNs) that cannot load offline")
    ap.add_argument("--show-external", action="store_true", help="list the external failures too")
    args = ap.parse_args(argv)
    try:
        rep = check_book(args.root, browser=not args.no_browser, strict_external=args.strict_external)
    except PktError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for p in rep.problems:
        print(p)
    if args.show_external:
        for p in rep.external:
            print(f"(external) {p}")
    print(rep.summary())
    return 0 if rep.ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
