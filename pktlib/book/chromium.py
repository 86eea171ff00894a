"""Headless Chromium for the book checker: a local HTTP server for the site, a proxy that
refuses (and logs) every request, the browser itself, and a small DevTools-protocol client
(:class:`CDP`) with viewport and screenshot helpers. Only the ``chromium`` binary is used."""
from __future__ import annotations

import base64
import contextlib
import functools
import http.server
import json
import os
import re
import shutil
import socketserver
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Iterator

from pktlib.errors import PktError

__all__ = ["CHROMIUM_FLAGS", "VIEWPORT", "MAX_SHOT_HEIGHT", "find_chromium", "serve", "RefusingProxy", "refusing_proxy",
           "launch_chromium", "CDP", "set_viewport", "screenshot"]

# The flags the project uses everywhere for headless Chromium (ENV-NOTES.md); the host resolver
# rule makes every non-local host fail at once instead of waiting for DNS on an offline machine.
CHROMIUM_FLAGS: tuple[str, ...] = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage", "--disable-default-apps", "--disable-extensions",
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
)

VIEWPORT = (1280, 900)
MAX_SHOT_HEIGHT = 16000  # px; longer pages are cut (Chromium's limit for one capture is 16384)


def find_chromium() -> str | None:
    """Path of a Chromium binary (``$CHROMIUM`` first), or None."""
    for cand in (os.environ.get("CHROMIUM"), "chromium", "chromium-browser", "google-chrome"):
        if cand and shutil.which(cand):
            return shutil.which(cand)
    return None


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:  # the report says what failed; no access log
        pass


@contextlib.contextmanager
def serve(root: Path) -> Iterator[str]:
    handler = functools.partial(QuietHandler, directory=str(root))
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}"
    finally:
        srv.shutdown()
        srv.server_close()


class RefusingProxy(socketserver.ThreadingTCPServer):
    """An HTTP proxy that logs the target of every request it gets and refuses it (403).

    The pages' browser context sends it every request for a host other than loopback, from the
    page, its workers and its style sheets alike."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self) -> None:
        self.log: list[tuple[float, str]] = []
        self.lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), RefusingHandler)


class RefusingHandler(socketserver.StreamRequestHandler):
    timeout = 5

    def handle(self) -> None:
        try:
            line = self.rfile.readline(8192).decode("latin-1").strip()
            while self.rfile.readline(8192).strip():  # the headers
                pass
        except OSError:
            return
        parts = line.split()
        if len(parts) >= 2:
            method, target = parts[0], parts[1]
            url = f"https://{target}" if method == "CONNECT" else target
            with self.server.lock:  # type: ignore[attr-defined]
                self.server.log.append((time.monotonic(), url))  # type: ignore[attr-defined]
        with contextlib.suppress(OSError):
            self.wfile.write(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")


@contextlib.contextmanager
def refusing_proxy() -> Iterator[RefusingProxy]:
    srv = RefusingProxy()
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()


@contextlib.contextmanager
def launch_chromium(binary: str, timeout: float = 60.0) -> Iterator[str]:
    """Start headless Chromium with a fresh profile; yield its browser DevTools websocket URL."""
    profile = tempfile.mkdtemp(prefix="pkt-chromium-")
    cmd = [binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--remote-debugging-port=0",
           "--remote-allow-origins=*", f"--window-size={VIEWPORT[0]},{VIEWPORT[1]}", "about:blank"]
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


class CDP:
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
            left = deadline - time.monotonic()
            if left <= 0:
                raise PktError(f"DevTools {method}: no answer within {timeout:.0f} s")
            try:
                data = json.loads(self.ws.recv(timeout=left))
            except TimeoutError:
                raise PktError(f"DevTools {method}: no answer within {timeout:.0f} s") from None
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


# Waits (at most 20 s) for MathJax's first typeset when the page loads MathJax.


def set_viewport(cdp: CDP, sess: str, height: int) -> None:
    cdp.call("Emulation.setDeviceMetricsOverride", {"width": VIEWPORT[0], "height": height,
                                                    "deviceScaleFactor": 1, "mobile": False}, session=sess)


def screenshot(cdp: CDP, sess: str, path: Path, *, full: bool) -> None:
    """The first screen, or (``full``) the whole page: the viewport is made as tall as the page
    (at most :data:`MAX_SHOT_HEIGHT`) for the capture, then set back."""
    if full:
        size = cdp.call("Page.getLayoutMetrics", session=sess).get("cssContentSize", {})
        set_viewport(cdp, sess, int(min(MAX_SHOT_HEIGHT, max(VIEWPORT[1], size.get("height", VIEWPORT[1])))))
        cdp.pump(0.3)  # relayout
    try:
        shot = cdp.call("Page.captureScreenshot", {"format": "png"}, session=sess, timeout=60)
    finally:
        if full:
            set_viewport(cdp, sess, VIEWPORT[1])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(base64.b64decode(shot["data"]))
