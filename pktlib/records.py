"""Results records: atomic JSON files that every run writes and the book is built from.

A notebook executed by ``pkt run`` (or :func:`run_notebook`) calls :func:`log_metrics` and
:func:`log_model`; those land in a sidecar file named by ``$PKT_RECORD_SIDECAR``. When the
notebook finishes, :func:`run_notebook` merges the sidecar with the parameters, wall time and
peak memory into ``<executed notebook>.record.json``. Outside ``pkt run`` the calls keep the
values in memory (see :func:`current`), so notebooks run interactively too.
"""
from __future__ import annotations

import json
import os
import platform
import resource
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path
from typing import Any, Iterator

from pktlib.errors import PktError

__all__ = [
    "atomic_dir",
    "atomic_path",
    "atomic_write_text",
    "write_json",
    "read_json",
    "log_metrics",
    "log_model",
    "current",
    "RunRecord",
    "run_notebook",
    "load_records",
    "to_jsonable",
]

SIDECAR_ENV = "PKT_RECORD_SIDECAR"


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary file beside ``path`` to write to; renamed onto ``path`` only on success.

    Readers never see a truncated file: an interrupted writer leaves ``path`` as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        # mkstemp creates 0600 files; give the result the usual permissions (umask applied).
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """A fresh temporary folder beside ``path``; on success it replaces ``path`` whole.

    A saved model or checkpoint folder is therefore complete or absent, never half-written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename: never a truncated file."""
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())


def to_jsonable(obj: Any) -> Any:
    """Dataclasses, tensors, numpy values and paths as plain JSON values."""
    if is_dataclass(obj) and not isinstance(obj, type):
        return to_jsonable(asdict(obj))
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "tolist"):  # torch / numpy
        return obj.tolist()
    if isinstance(obj, float) and obj != obj:
        return None
    return obj


def write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(to_jsonable(obj), indent=2, sort_keys=False) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PktError(f"record not found: {path}") from None
    except json.JSONDecodeError as e:
        raise PktError(f"{path}:{e.lineno}: malformed JSON ({e.msg})") from None


# ----------------------------------------------------------------------------------------
# Logging from inside a notebook

_MEMORY: dict[str, Any] = {"metrics": {}, "models": {}}


def _sidecar() -> Path | None:
    p = os.environ.get(SIDECAR_ENV)
    return Path(p) if p else None


def current() -> dict[str, Any]:
    """Everything logged so far in this process (or in the sidecar under ``pkt run``)."""
    p = _sidecar()
    if p is not None and p.is_file():
        return read_json(p)
    return _MEMORY


def _update(section: str, values: dict[str, Any]) -> None:
    data = current()
    data.setdefault(section, {}).update(to_jsonable(values))
    p = _sidecar()
    if p is not None:
        write_json(p, data)
    else:
        _MEMORY.update(data)


def log_metrics(**metrics: Any) -> None:
    """Record named results (numbers, tables as lists/dicts) of the running notebook."""
    _update("metrics", metrics)


def log_model(role: str, source: str | os.PathLike, model=None) -> None:
    """Record a model used by the run: its id/path and weights hash (from files, else tensors)."""
    from pktlib.models import weights_hash

    h = weights_hash(source) if Path(str(source)).exists() else (weights_hash(model) if model is not None else "unknown")
    _update("models", {role: {"source": str(source), "weights_sha256": h}})


# ----------------------------------------------------------------------------------------
# Executing notebooks


@dataclass
class RunRecord:
    notebook: str
    output: str
    parameters: dict[str, Any]
    models: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    seed: Any = None
    wall_time_s: float = 0.0
    peak_memory_mb: float = 0.0
    started: str = ""
    host: str = field(default_factory=platform.node)
    pktlib_version: str = ""


def record_path(output_notebook: str | os.PathLike) -> Path:
    p = Path(output_notebook)
    return p.with_name(p.stem + ".record.json")


def run_notebook(notebook: str | os.PathLike, output: str | os.PathLike | None = None,
                 parameters: dict[str, Any] | None = None, *, cwd: str | os.PathLike | None = None,
                 progress: bool = True) -> RunRecord:
    """Execute ``notebook`` with papermill and write its record beside the executed copy.

    ``output`` defaults to ``book/<notebook name>``. The record (``<output stem>.record.json``)
    holds the parameters, the models and metrics the notebook logged, its seed parameter,
    wall time and the kernel's peak resident memory.
    """
    import papermill as pm

    import pktlib

    notebook = Path(notebook)
    if not notebook.is_file():
        raise PktError(f"notebook not found: {notebook}")
    output = Path(output) if output else Path("book") / notebook.name
    output.parent.mkdir(parents=True, exist_ok=True)
    parameters = dict(parameters or {})
    sidecar = output.with_name(f".{output.stem}.sidecar.json")
    if sidecar.exists():
        sidecar.unlink()
    old = os.environ.get(SIDECAR_ENV)
    os.environ[SIDECAR_ENV] = str(sidecar.resolve())
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    t0 = time.perf_counter()
    try:
        tmp_out = output.with_name(f".{output.name}.partial.ipynb")
        pm.execute_notebook(str(notebook), str(tmp_out), parameters=parameters, progress_bar=progress,
                            cwd=str(cwd) if cwd else None, kernel_name="python3")
        os.replace(tmp_out, output)
    finally:
        if old is None:
            os.environ.pop(SIDECAR_ENV, None)
        else:
            os.environ[SIDECAR_ENV] = old
    wall = time.perf_counter() - t0
    logged = read_json(sidecar) if sidecar.exists() else {}
    if sidecar.exists():
        sidecar.unlink()
    # ru_maxrss of finished children, in KiB on Linux: the kernel is the largest child.
    peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    effective = {**notebook_defaults(notebook), **parameters}
    rec = RunRecord(
        notebook=str(notebook), output=str(output), parameters=effective,
        models=logged.get("models", {}), metrics=logged.get("metrics", {}),
        seed=effective.get("seed", effective.get("seeds")),
        wall_time_s=round(wall, 2), peak_memory_mb=round(peak_mb, 1), started=started,
        pktlib_version=getattr(pktlib, "__version__", ""),
    )
    write_json(record_path(output), rec)
    return rec


def notebook_defaults(notebook: str | os.PathLike) -> dict[str, Any]:
    """Defaults of the notebook's ``parameters`` cell (values that are Python literals)."""
    import ast

    import papermill as pm

    out = {}
    for name, p in pm.inspect_notebook(str(notebook)).items():
        try:
            out[name] = ast.literal_eval(p["default"])
        except (ValueError, SyntaxError):  # an expression, not a literal: keep its source
            out[name] = p["default"]
    return out


def load_records(folder: str | os.PathLike = "book") -> dict[str, dict[str, Any]]:
    """All ``*.record.json`` under ``folder``, keyed by the executed notebook's stem."""
    out = {}
    for p in sorted(Path(folder).rglob("*.record.json")):
        out[p.name[: -len(".record.json")]] = read_json(p)
    return out


def cpu_seconds() -> float:
    """CPU seconds (user + system) used so far by this process and its finished children.

    The cost of a step on any machine, busy or idle (unlike wall time): take the difference
    around it. Children (e.g. the code sandbox's processes) count once they have been waited for.
    """
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


__all__ += ["cpu_seconds"]
