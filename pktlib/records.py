"""Results records: atomic JSON files that every run writes and the book is built from.

A notebook executed by ``pkt run`` (or :func:`run_notebook`) calls :func:`log_metrics`,
:func:`log_model` and, when it reads another chapter's record, :func:`log_input`; those land in a sidecar file named by ``$PKT_RECORD_SIDECAR``. When the
notebook finishes, :func:`run_notebook` merges the sidecar with the parameters, wall time and
peak memory into ``<executed notebook>.record.json``. Outside ``pkt run`` the calls keep the
values in memory (see :func:`current`), so notebooks run interactively too.
"""
from __future__ import annotations

import ast
import hashlib
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path
from typing import Any, Iterator

import papermill as pm

from pktlib import __version__
from pktlib.errors import PktError

__all__ = [
    "atomic_dir",
    "atomic_path",
    "atomic_write_text",
    "write_json",
    "read_json",
    "log_metrics",
    "log_model",
    "log_input",
    "record_digest",
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
    # Imported here, not above: pktlib.models imports torch and transformers, and the book builder
    # (pktlib.book) imports this module to read and write records without them.
    from pktlib.models import weights_hash

    h = weights_hash(source) if Path(str(source)).exists() else (weights_hash(model) if model is not None else "unknown")
    _update("models", {role: {"source": str(source), "weights_sha256": h}})


def record_digest(path: str | os.PathLike) -> str | None:
    """SHA-256 (16 hex digits) of the file at ``path``, or None when there is none."""
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]
    except FileNotFoundError:
        return None


def log_input(name: str, path: str | os.PathLike) -> None:
    """Record that the running chapter read another chapter's record ``path`` (by that chapter's
    ``name``, e.g. ``"laten"``), with its :func:`record_digest` (None: it did not exist). The book
    builder re-executes the chapter once that record changes (:func:`pktlib.book.build.stale_reason`)."""
    _update("inputs", {name: {"path": str(path), "sha256": record_digest(path)}})


# ----------------------------------------------------------------------------------------
# Executing notebooks


@dataclass
class RunRecord:
    notebook: str
    output: str
    parameters: dict[str, Any]
    models: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    inputs: dict[str, Any] = field(default_factory=dict)  # other chapters' records it read (log_input)
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
    holds the parameters, the models, metrics and input records the notebook logged, its seed parameter,
    wall time and the run's peak resident memory (:func:`_execute_measured`). A failing cell is
    a :class:`PktError` naming the notebook and the cell's error.
    """
    notebook = Path(notebook)
    if not notebook.is_file():
        raise PktError(f"notebook not found: {notebook}")
    output = Path(output) if output else Path("book") / notebook.name
    output.parent.mkdir(parents=True, exist_ok=True)
    parameters = dict(parameters or {})
    sidecar = output.with_name(f".{output.stem}.sidecar.json")
    if sidecar.exists():
        sidecar.unlink()
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    t0 = time.perf_counter()
    tmp_out = output.with_name(f".{output.name}.partial.ipynb")
    peak_mb = _execute_measured(notebook, tmp_out, parameters, cwd=cwd, progress=progress,
                                sidecar=sidecar.resolve())
    os.replace(tmp_out, output)
    wall = time.perf_counter() - t0
    logged = read_json(sidecar) if sidecar.exists() else {}
    if sidecar.exists():
        sidecar.unlink()
    effective = {**notebook_defaults(notebook), **parameters}
    rec = RunRecord(
        notebook=str(notebook), output=str(output), parameters=effective,
        models=logged.get("models", {}), metrics=logged.get("metrics", {}), inputs=logged.get("inputs", {}),
        seed=effective.get("seed", effective.get("seeds")),
        wall_time_s=round(wall, 2), peak_memory_mb=round(peak_mb, 1), started=started,
        pktlib_version=__version__,
    )
    write_json(record_path(output), rec)
    return rec


def _execute_measured(notebook: Path, output: Path, parameters: dict[str, Any], *,
                      cwd: str | os.PathLike | None, progress: bool, sidecar: Path) -> float:
    """Execute ``notebook`` with papermill in a fresh child process; the run's peak memory in MiB.

    The child sets ``$PKT_RECORD_SIDECAR`` to ``sidecar`` for the kernel (what the notebook logs
    goes there), in its own environment, not this process's: several chapters may run at once
    (:func:`pktlib.book.build.execute_all` with ``jobs`` > 1).

    The child runs papermill, which starts the kernel and reaps it (and the kernel reaps what it
    started: a vLLM engine, sandboxed programs); the child's ``RUSAGE_CHILDREN`` maximum resident
    size afterwards is therefore the largest of those processes: this run's own peak, reported
    back in a small JSON file. ``RUSAGE_CHILDREN`` of *this* process would instead be the largest
    child ever, so after a large chapter every later small one recorded the large one's peak.
    (The child's own size is left out on purpose: on Linux a process's maximum resident size
    starts at that of the process it was forked from, here whatever called this function.)
    """
    with tempfile.TemporaryDirectory(prefix="pkt-run-") as tmp:
        spec_file, result_file = Path(tmp) / "run.json", Path(tmp) / "result.json"
        spec_file.write_text(json.dumps({
            "notebook": str(notebook), "output": str(output), "parameters": to_jsonable(parameters),
            "cwd": str(cwd) if cwd else None, "progress": progress, "result": str(result_file),
            "sidecar": str(sidecar)}), encoding="utf-8")
        proc = subprocess.Popen([sys.executable, "-c", "from pktlib.records import _execute_child; _execute_child()",
                                 str(spec_file)])
        try:
            code = proc.wait()
        except BaseException:  # interrupted: leave no papermill (nor kernel) behind
            proc.terminate()
            proc.wait()
            raise
        result = json.loads(result_file.read_text(encoding="utf-8")) if result_file.is_file() else {}
        if code != 0 or "error" in result:
            if "error" in result:
                raise PktError(f"{notebook} failed: {result['error']}")
            raise PktError(f"{notebook}: executing it ended with exit status {code}")
    return result["peak_kib"] / 1024  # ru_maxrss is in KiB on Linux


def _execute_child() -> None:
    """The child of :func:`_execute_measured`: papermill, then its children's peak or the error."""
    spec = json.loads(Path(sys.argv[1]).read_text(encoding="utf-8"))
    out = Path(spec["result"])
    os.environ[SIDECAR_ENV] = spec["sidecar"]  # the kernel papermill starts inherits it
    try:
        pm.execute_notebook(spec["notebook"], spec["output"], parameters=spec["parameters"],
                            progress_bar=spec["progress"], cwd=spec["cwd"], kernel_name="python3")
    except BaseException as e:  # the parent reports it as one line
        message = f"{type(e).__name__}: {str(e).strip()}"
        if type(e).__name__ == "PapermillExecutionError":  # the cell's own error, not papermill's banner
            message = f"cell {getattr(e, 'exec_count', '?')}: {getattr(e, 'ename', '')}: {getattr(e, 'evalue', '')}"
        out.write_text(json.dumps({"error": message}), encoding="utf-8")
        raise SystemExit(1)
    out.write_text(json.dumps({"peak_kib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}), encoding="utf-8")


def notebook_defaults(notebook: str | os.PathLike) -> dict[str, Any]:
    """Defaults of the notebook's ``parameters`` cell (values that are Python literals)."""
    out = {}
    try:
        found = pm.inspect_notebook(str(notebook))
    except ValueError as e:  # e.g. no kernel name in the notebook's metadata
        raise PktError(f"{notebook}: cannot read its parameters ({e})") from None
    for name, p in found.items():
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
