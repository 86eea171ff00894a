"""Building the book: execute every notebook listed in ``_toc.yml`` with papermill, then Sphinx.

``_toc.yml`` lists executed notebooks as ``book/<name>``; their sources are
``notebooks/<name>.ipynb``. An executed copy whose record is newer than its source is kept
(so an interrupted ``make book`` resumes), unless ``force`` or :func:`stale_reason` finds it
stale for another reason (it ran on a pocket pair the code no longer builds, it ran with
parameters other than the notebook's defaults, another chapter's record it reads changed, or it
is a summary older than the records it reads). A chapter that reads other chapters' records
declares them (``metadata.pktlib.reads``, e.g. ``["laten"]`` for ``book/laten.record.json``) and
logs the digest of what it read (:func:`pktlib.records.log_input`). A chapter executed with other parameters (``pkt run -p ...`` writes to ``book/`` too) is
not the book's chapter: it is executed again, or kept only when the user asks (``keep_params``).

Optional chapters (``metadata.pktlib.optional`` names what they need, e.g. "the real pair:
make real-pair") are not executed by the default run, which must work on any machine:
``execute_all(optional=True)`` (``pkt book --execute --optional``, ``make book-real``) executes
them, and the HTML build includes an optional chapter only once its record exists
(:func:`book_toc` writes the table of contents without the others).
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

import nbformat
import yaml

from pktlib.book.assets import check
from pktlib.errors import PktError
from pktlib.records import notebook_defaults, record_digest, record_path, run_notebook

__all__ = ["toc_entries", "notebook_chapters", "optional_need", "reads_records", "changed_inputs", "stale_reason", "parameter_drift",
           "chapter_dependencies",
           "non_default_chapters", "execute_all", "book_toc", "build_book"]


def toc_entries(root: str | Path = ".") -> list[str]:
    """Every ``file`` of ``_toc.yml`` (root first), in reading order."""
    toc_file = Path(root) / "_toc.yml"
    if not toc_file.is_file():
        raise PktError(f"no _toc.yml in {Path(root).resolve()}")
    toc = yaml.safe_load(toc_file.read_text())
    out = [toc["root"]]

    def walk(node):
        if isinstance(node, dict):
            if "file" in node:
                out.append(node["file"])
            for key in ("parts", "chapters", "sections"):
                for child in node.get(key, []) or []:
                    walk(child)

    walk(toc)
    return out


def notebook_chapters(root: str | Path = ".") -> list[tuple[Path, Path]]:
    """``(source notebook, executed copy)`` for each toc entry that has a source notebook."""
    root = Path(root)
    pairs = []
    for entry in toc_entries(root):
        name = Path(entry).name
        src = root / "notebooks" / f"{name}.ipynb"
        if src.is_file():
            pairs.append((src, root / "book" / f"{name}.ipynb"))
    return pairs


def optional_need(src: Path) -> str | None:
    """What an optional chapter needs (``metadata.pktlib.optional``), or None for a default chapter."""
    need = nbformat.read(src, as_version=4).metadata.get("pktlib", {}).get("optional")
    return str(need) if need else None


def reads_records(src: Path) -> list[str]:
    """The chapters whose records ``src`` reads (``metadata.pktlib.reads``), e.g. ``["laten"]``."""
    return [str(n) for n in nbformat.read(src, as_version=4).metadata.get("pktlib", {}).get("reads", [])]


def changed_inputs(record: dict[str, Any], reads: list[str], book: Path) -> list[str]:
    """The input records (``<name>.record.json`` in ``book``) that differ from what ``record`` logged
    it read (:func:`pktlib.records.log_input`): each declared in ``reads`` or logged, whose current
    digest is not the logged one, or declared but never logged."""
    logged = record.get("inputs") or {}
    return [f"{name}.record.json" for name in sorted(set(reads) | set(logged))
            if name not in logged or logged[name].get("sha256") != record_digest(book / f"{name}.record.json")]


def _is_summary(src: Path) -> bool:
    """A summary chapter (``metadata.pktlib.summary``) reads other chapters' records."""

    return bool(nbformat.read(src, as_version=4).metadata.get("pktlib", {}).get("summary"))


def parameter_drift(src: Path, rec: Path) -> dict[str, tuple]:
    """``{name: (recorded, default)}`` for each parameter the record ``rec`` ran with that differs
    from the notebook ``src``'s current default (empty: it ran with the defaults)."""

    try:
        params = json.loads(rec.read_text(encoding="utf-8")).get("parameters") or {}
    except ValueError:
        return {"(record)": ("unreadable", str(rec))}
    if not params:
        return {}
    defaults = notebook_defaults(src)
    return {k: (v, defaults[k]) for k, v in params.items() if k in defaults and v != defaults[k]}


def _drift_text(drift: dict[str, tuple]) -> str:
    return ", ".join(f"{k}={v!r} (default {d!r})" for k, (v, d) in drift.items())


def non_default_chapters(root: str | Path = ".") -> list[str]:
    """One line per executed chapter whose record ran with non-default parameters."""
    root = Path(root)
    out = []
    for src, executed in notebook_chapters(root):
        rec = record_path(executed)
        drift = parameter_drift(src, rec) if rec.is_file() else {}
        if drift:
            out.append(f"{executed} ran with {_drift_text(drift)}")
    return out


def stale_reason(src: Path, out: Path, root: Path, *, keep_params: bool = False) -> str | None:
    """Why the executed copy ``out`` of ``src`` must be executed again, or None if it is up to date.

    ``keep_params``: a record made with non-default parameters counts as up to date.
    """
    rec = record_path(out)
    if not (out.is_file() and rec.is_file()):
        return "not executed yet"
    if rec.stat().st_mtime < src.stat().st_mtime:
        return "the notebook changed"
    if not keep_params:
        drift = parameter_drift(src, rec)
        if drift:
            return f"it ran with non-default parameters: {_drift_text(drift)} (--keep-params keeps it)"
    if _is_summary(src):  # stale as soon as any other record is newer than its own
        others = [p for p in (root / "book").glob("*.record.json") if p != rec]
        newer = sorted(p.name for p in others if p.stat().st_mtime > rec.stat().st_mtime)
        return f"newer records: {', '.join(newer)}" if newer else None
    try:
        record = json.loads(rec.read_text(encoding="utf-8"))
    except ValueError:
        return f"unreadable record {rec}"
    changed = changed_inputs(record, reads_records(src), root / "book")
    if changed:
        return f"its input record{'s' if len(changed) > 1 else ''} {', '.join(changed)} changed"
    models = record.get("models") or {}
    # A chapter run on a pocket pair the code no longer builds (a preset or training change).
    # Imported here, as the test of deferred imports records: the zoo loads torch, which building
    # the HTML alone does not need.
    from pktlib.zoo import pair_is_current

    old = sorted(role for role, m in models.items() if pair_is_current(m.get("source", "")) is False)
    return f"its pocket pair changed (the {', '.join(old)} it logged)" if old else None


def chapter_dependencies(chapters: list[Path]) -> dict[str, set[str]]:
    """``{chapter: the chapters among these that must finish before it starts}``: the ones whose
    records it declares it reads (``metadata.pktlib.reads``), and for a summary chapter every
    other one (it reads all records)."""
    names = [src.stem for src in chapters]
    return {src.stem: (set(names) - {src.stem} if _is_summary(src) else set(reads_records(src)) & set(names))
            for src in chapters}


def execute_all(root: str | Path = ".", *, force: bool = False, only: list[str] | None = None,
                keep_params: bool = False, optional: bool = False, jobs: int = 1) -> None:
    """Execute the book's notebooks (skipping up-to-date ones unless ``force``; ``keep_params``:
    see :func:`stale_reason`). ``optional``: execute the optional chapters instead of the default
    ones (module docstring); a chapter named in ``only`` runs either way.

    ``jobs`` chapters run at once, each in its own papermill process, in toc order as far as
    :func:`chapter_dependencies` allows: a chapter starts once the chapters it reads have finished,
    and whether it is stale is decided then, against their new records. Most chapters train and
    score the pocket pair on one CPU thread, so on a 2-core machine ``jobs=2`` keeps both cores
    busy. With several jobs the chapters' progress bars are off (two would garble one terminal)
    and a line says when each starts and ends. A failed chapter stops new starts; the running
    ones finish, then its PktError is raised. Raises PktError for ``jobs`` < 1.
    """
    if jobs < 1:
        raise PktError(f"jobs must be >= 1, got {jobs}")
    root = Path(root)
    todo: list[tuple[Path, Path]] = []
    for src, out in notebook_chapters(root):
        if only and src.stem not in only:
            continue
        need = optional_need(src)
        if not only and bool(need) != optional:
            if need:
                print(f"[book] {src.stem}: optional (needs {need}); `pkt book --execute --optional` runs it",
                      flush=True)
            continue
        todo.append((src, out))
    waits = chapter_dependencies([src for src, _ in todo])
    done: set[str] = set()
    errors: list[PktError] = []

    def run(src: Path, out: Path, reason: str) -> None:
        t0 = time.perf_counter()
        print(f"[book] executing {src} -> {out} ({reason})", flush=True)
        run_notebook(src, out, cwd=root, progress=jobs == 1)
        print(f"[book] {src.stem}: {time.perf_counter() - t0:.0f} s", flush=True)

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        running: dict[Future, str] = {}
        while todo or running:
            while not errors and len(running) < jobs:
                ready = next((c for c in todo if waits[c[0].stem] <= done), None)
                if ready is None:
                    break
                todo.remove(ready)
                src, out = ready
                reason = "forced" if force else stale_reason(src, out, root, keep_params=keep_params)
                if reason is None:
                    print(f"[book] {src.stem}: up to date (record {record_path(out)}); --force to rerun", flush=True)
                    done.add(src.stem)
                else:
                    running[pool.submit(run, src, out, reason)] = src.stem
            if not running:
                if todo and not errors:
                    raise PktError(f"chapters {', '.join(s.stem for s, _ in todo)} wait on each other "
                                   "(their metadata.pktlib.reads form a cycle)")
                break
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for f in finished:
                name = running.pop(f)
                try:
                    f.result()
                    done.add(name)
                except PktError as e:
                    errors.append(e)
    if errors:
        raise errors[0]


def _drop_entries(node: Any, drop: set[str]) -> Any:
    """``node`` of a toc without the files in ``drop``; parts left without chapters go too."""
    if isinstance(node, list):
        kept = [_drop_entries(n, drop) for n in node if not (isinstance(n, dict) and n.get("file") in drop)]
        return [n for n in kept if not (isinstance(n, dict) and "chapters" in n and not n["chapters"]
                                        and "file" not in n)]
    if isinstance(node, dict):
        return {k: _drop_entries(v, drop) for k, v in node.items()}
    return node


def book_toc(root: str | Path = ".") -> tuple[Path, list[str]]:
    """The table of contents to build with, and the optional chapters it leaves out.

    ``_toc.yml`` itself when every optional chapter has its executed copy and record; else a
    copy without those chapters (and without parts they leave empty) in ``_build/``.
    """
    root = Path(root)
    drop = sorted(f"book/{src.stem}" for src, out in notebook_chapters(root)
                  if optional_need(src) and not (out.is_file() and record_path(out).is_file()))
    toc_file = root / "_toc.yml"
    if not drop:
        return toc_file, []
    toc = _drop_entries(yaml.safe_load(toc_file.read_text()), set(drop))
    out = root / "_build" / "_toc.yml"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(yaml.safe_dump(toc, sort_keys=False))
    return out, drop


def build_book(root: str | Path = ".", *, strict: bool = False) -> Path:
    """Run ``jupyter-book build`` (notebooks are not executed by the build) -> ``_build/html``.

    Optional chapters not executed yet are left out of the table of contents (:func:`book_toc`).
    """
    root = Path(root)
    toc_file, left_out = book_toc(root)
    if left_out:
        print(f"[book] left out (optional, not executed): {', '.join(left_out)}", flush=True)
    left = set(left_out)
    missing = [e for e in toc_entries(root) if e not in left
               and not any((root / f"{e}{ext}").is_file() for ext in ("", ".md", ".ipynb"))]
    if missing:
        raise PktError(f"_toc.yml lists pages that do not exist (execute the notebooks first?): {missing}")
    # The pages must work offline: MathJax and the widget runtime come from pinned npm
    # packages served with the book (the Sphinx extension checks too; this says it first).

    missing_assets = check(root / "book" / "_static" / "npm")
    if missing_assets:
        raise PktError("offline assets missing: " + "; ".join(missing_assets))
    jb = Path(sys.executable).with_name("jupyter-book")
    cmd = [str(jb), "build", str(root), "--toc", str(toc_file)] + (["-W", "-n", "--keep-going"] if strict else [])
    proc = subprocess.run(cmd)
    if proc.returncode != 0:
        raise PktError(f"jupyter-book build failed (exit {proc.returncode})")
    index = root / "_build" / "html" / "index.html"
    # The records travel with the pages, so the scorecard's "record" links resolve.
    for rec in (root / "book").glob("*.record.json"):
        shutil.copy2(rec, root / "_build" / "html" / "book" / rec.name)
    print(f"[book] built {index}")
    return index
