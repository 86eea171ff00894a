"""Offline assets of the HTML book: MathJax and the Jupyter widget runtime, from npm, pinned.

The rendered book must work on a machine with no internet (cluster nodes, the build machines),
so nothing it needs may come from a CDN. This module installs pinned npm packages into a folder
that Sphinx serves as static files (``book/_static/npm``, see ``_config.yml``)::

    python -m pktlib.book.assets install book/_static/npm   # `make assets`
    python -m pktlib.book.assets check book/_static/npm

Each package is fetched with the ordinary npm client (``npm pack NAME@VERSION``; no install
scripts run, nothing is imported or executed here), its tarball's SHA-512 is compared with the
pin below **before** anything is unpacked, and only the files the book needs are extracted
(tar members filtered with ``tarfile``'s "data" filter: no links out of the folder, no devices).
A package is unpacked into a temporary folder and renamed into place, so a mismatch or an
interrupted download leaves nothing behind. A stamp file records what was installed; a package
whose stamp matches its pin is not fetched again.

MathJax 4 (``mathjax`` with its default font package ``@mathjax/mathjax-newcm-font``) is the
maintained major version; in a browser it loads fonts from jsDelivr unless ``loader.paths.fonts``
points elsewhere, which ``_config.yml`` does (``[mathjax]/../@mathjax``, this folder's layout).
The widget runtime is ``@jupyter-widgets/html-manager``'s ``embed-amd.js`` with RequireJS, the
pair myst-nb loads for notebooks with widget state (``nb_ipywidgets_js``).
"""
from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from pktlib.errors import PktError

__all__ = ["NpmAsset", "ASSETS", "STAMP", "sri_sha512", "install", "check", "main"]

STAMP = ".pkt-asset.json"


@dataclass(frozen=True)
class NpmAsset:
    """One pinned npm package: ``integrity`` is the registry's ``dist.integrity`` (SRI sha512),
    ``keep`` the package-relative paths to extract (a trailing ``/`` keeps a whole folder)."""

    name: str
    version: str
    integrity: str
    keep: tuple[str, ...]

    def wanted(self, rel: str) -> bool:
        return any(rel == k or (k.endswith("/") and rel.startswith(k)) for k in self.keep)


ASSETS: tuple[NpmAsset, ...] = (
    NpmAsset("mathjax", "4.1.3",
             "sha512-BN/8Pkgn7G1pIDYJqd9md+JHsE/jydSYbyOZnSdSA0WziuVO8mRxdYiWFumkVVly/8U+hm9DpIIoWuvySverzw==",
             # the combined TeX+MathML -> CommonHTML component and what it loads on demand
             # (TeX extensions, the menu, the accessibility explorer and its speech worker)
             ("LICENSE", "package.json", "tex-mml-chtml.js", "input/", "output/", "a11y/", "sre/", "ui/",
              "adaptors/")),
    NpmAsset("@mathjax/mathjax-newcm-font", "4.1.3",
             "sha512-gzAB3dFHilHX1l5x2xUqRL+1jDQt3Fyza1DkEMVXWC4E8SvsGdlgEza47HYi2WhVcgfkvf4zgUGzuhbq3Pjlew==",
             ("package.json", "chtml.js", "chtml/")),  # licence (Apache-2.0) in package.json
    NpmAsset("requirejs", "2.3.7",
             "sha512-DouTG8T1WanGok6Qjg2SXuCMzszOo0eHeH9hDZ5Y4x8Je+9JB38HdTLT4/VA8OaUhBa0JPVHJ0pyBkM1z+pDsw==",
             ("package.json", "require.js")),
    NpmAsset("@jupyter-widgets/html-manager", "1.0.15",
             "sha512-5thBIV6ymNgmPVOHvzx+gGy8ZSKmSazhtGw4/c4xJDVzRhG9PTeQsRjF3FUTopvFi//SABeNz1yp47bCrJ3CQA==",
             # embed-amd.js and the icon fonts its stylesheet refers to (beside it in dist/)
             ("package.json", "dist/embed-amd.js", "dist/embed.js.LICENSE.txt")
             + tuple(f"dist/{f}" for f in ("1551f4f60c37af51121f.woff2", "7a3337626410ca2f4071.woff2",
                                            "d878b0a6a1144760244f.woff2", "2285773e6b4b172f07d9.woff",
                                            "bb58e57c48a3e911f15f.woff", "eeccf4f66002c6f2ba24.woff",
                                            "491974d108fe4002b2aa.ttf", "527940b104eb2ea366c8.ttf",
                                            "be9ee23c0c6390141475.ttf"))),
)


def sri_sha512(data: bytes) -> str:
    """Subresource-integrity string of ``data`` (``sha512-<base64>``), as npm records it."""
    return "sha512-" + base64.b64encode(hashlib.sha512(data).digest()).decode()


def npm_pack(asset: NpmAsset, folder: Path) -> Path:
    """Download the package tarball with ``npm pack`` (no lifecycle scripts) into ``folder``."""
    npm = shutil.which("npm")
    if npm is None:
        raise PktError("npm not found: install Node.js (Debian package nodejs/npm) to fetch the book's offline assets")
    proc = subprocess.run([npm, "pack", f"{asset.name}@{asset.version}", "--pack-destination", str(folder),
                           "--ignore-scripts", "--json", "--silent"], capture_output=True, text=True)
    if proc.returncode != 0:
        raise PktError(f"npm pack {asset.name}@{asset.version} failed: {proc.stderr.strip()[-300:]}")
    try:
        filename = json.loads(proc.stdout)[0]["filename"]
    except (ValueError, LookupError, TypeError):
        raise PktError(f"npm pack {asset.name}@{asset.version}: unexpected output {proc.stdout[:200]!r}") from None
    return folder / filename


def _stamp(dest: Path, asset: NpmAsset) -> Path:
    return dest / asset.name / STAMP


def _installed(dest: Path, asset: NpmAsset) -> bool:
    try:
        s = json.loads(_stamp(dest, asset).read_text())
    except (OSError, ValueError):
        return False
    return s.get("version") == asset.version and s.get("integrity") == asset.integrity


def _unpack(tgz: Path, asset: NpmAsset, target: Path) -> int:
    """Extract the wanted members of an npm tarball (root folder ``package/``) into ``target``."""
    n = 0
    with tarfile.open(tgz, "r:gz") as tf:
        for m in tf.getmembers():
            head, _, rel = m.name.partition("/")
            if not rel or not m.isfile() or not asset.wanted(rel):
                continue
            m.name = rel
            try:
                tf.extract(m, target, filter="data")
            except tarfile.FilterError as e:
                raise PktError(f"{asset.name}@{asset.version}: refusing tar member {rel!r} ({e})") from None
            n += 1
    missing = [k for k in asset.keep if not k.endswith("/") and not (target / k).is_file()]
    if missing:
        raise PktError(f"{asset.name}@{asset.version}: the tarball lacks {missing}")
    return n


def install(dest: str | os.PathLike, assets: Sequence[NpmAsset] = ASSETS, *,
            fetch: Callable[[NpmAsset, Path], Path] = npm_pack, quiet: bool = False) -> list[str]:
    """Install ``assets`` under ``dest/<package name>/``; returns the names fetched this time.

    Raises :class:`PktError` (and leaves the package's folder as it was) when a tarball's
    SHA-512 differs from its pin, a wanted file is missing, or a member would escape the folder.
    """
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    fetched = []
    for asset in assets:
        if _installed(dest, asset):
            continue
        with tempfile.TemporaryDirectory(prefix="pkt-npm-", dir=dest) as tmp:
            tgz = fetch(asset, Path(tmp))
            got = sri_sha512(tgz.read_bytes())
            if got != asset.integrity:
                raise PktError(f"{asset.name}@{asset.version}: tarball hash {got[:30]}... differs from the pinned "
                               f"{asset.integrity[:30]}...; nothing installed")
            staged = Path(tmp) / "package"
            n = _unpack(tgz, asset, staged)
            (staged / STAMP).write_text(json.dumps({"name": asset.name, "version": asset.version,
                                                     "integrity": asset.integrity, "files": n}) + "\n")
            final = dest / asset.name
            final.parent.mkdir(parents=True, exist_ok=True)
            old = final.with_name(f".{final.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            if final.exists():
                os.replace(final, old)
            os.replace(staged, final)
            shutil.rmtree(old, ignore_errors=True)
        fetched.append(asset.name)
        if not quiet:
            print(f"[assets] {asset.name}@{asset.version}: {n} files, sha512 verified", flush=True)
    return fetched


def check(dest: str | os.PathLike, assets: Sequence[NpmAsset] = ASSETS) -> list[str]:
    """Problems with the installed assets under ``dest`` (empty when all are present and pinned)."""
    dest = Path(dest)
    return [f"{a.name}@{a.version} is not installed in {dest} (run `make assets`)"
            for a in assets if not _installed(dest, a)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pktlib.book.assets", description=__doc__.splitlines()[0])
    ap.add_argument("action", choices=["install", "check"])
    ap.add_argument("dest", nargs="?", default="book/_static/npm")
    args = ap.parse_args(argv)
    try:
        if args.action == "install":
            install(args.dest)
        problems = check(args.dest)
    except PktError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for p in problems:
        print(f"error: {p}", file=sys.stderr)
    if not problems:
        print(f"[assets] {len(ASSETS)} packages in {args.dest}: " + ", ".join(f"{a.name}@{a.version}" for a in ASSETS))
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
