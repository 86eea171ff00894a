"""When `pkt book` re-executes a chapter: records older than their notebook or their pocket pair."""
from __future__ import annotations

import json
import os
from pathlib import Path

import nbformat
import pytest

from pktlib import zoo
from pktlib.book.build import stale_reason
from pktlib.records import record_path


def _chapter(root: Path, name: str, models: dict, *, summary: bool = False, reads: list[str] | None = None,
             inputs: dict | None = None) -> tuple[Path, Path]:
    src, out = root / "notebooks" / f"{name}.ipynb", root / "book" / f"{name}.ipynb"
    for p in (src, out):
        p.parent.mkdir(parents=True, exist_ok=True)
        nb = nbformat.v4.new_notebook()
        if summary:
            nb.metadata["pktlib"] = {"summary": True}
        if reads is not None:
            nb.metadata["pktlib"] = {"reads": reads}
        nbformat.write(nb, p)
    record_path(out).write_text(json.dumps({"models": models, **({"inputs": inputs} if inputs is not None else {})}))
    return src, out


def _age(path: Path, seconds: float) -> None:
    t = path.stat().st_mtime - seconds
    os.utime(path, (t, t))


def test_stale_when_missing_or_older_than_its_notebook(tmp_path):
    src, out = _chapter(tmp_path, "a", {})
    assert stale_reason(src, out, tmp_path) is None
    _age(record_path(out), 100)
    assert stale_reason(src, out, tmp_path) == "the notebook changed"
    record_path(out).unlink()
    assert stale_reason(src, out, tmp_path) == "not executed yet"


def test_stale_when_run_on_a_pocket_pair_the_code_no_longer_builds(tmp_path):
    current = zoo.pair_dir("tiny", 0)
    old = current.with_name("pair-tiny-s0-0123456789")
    src, out = _chapter(tmp_path, "a", {"teacher": {"source": str(current / "teacher-chat")},
                                         "hub": {"source": "meta-llama/Llama-2-7b-chat-hf"}})
    assert stale_reason(src, out, tmp_path) is None
    src, out = _chapter(tmp_path, "b", {"teacher": {"source": str(current / "teacher-chat")},
                                         "student": {"source": str(old / "student-chat")}})
    assert stale_reason(src, out, tmp_path) == "its pocket pair changed (the student it logged)"


def test_summary_stale_when_another_record_is_newer(tmp_path):
    _chapter(tmp_path, "a", {})
    src, out = _chapter(tmp_path, "summary", {}, summary=True)
    _age(record_path(out), 100)
    _age(src, 200)
    assert stale_reason(src, out, tmp_path) == "newer records: a.record.json"


def test_stale_when_an_input_record_it_read_changed(tmp_path, monkeypatch):
    from pktlib import records

    laten_src, laten_out = _chapter(tmp_path, "laten", {})
    laten_rec = record_path(laten_out)
    # what the reading chapter logs while it runs (no sidecar: in memory)
    monkeypatch.setattr(records, "_MEMORY", {"metrics": {}, "models": {}})
    monkeypatch.delenv(records.SIDECAR_ENV, raising=False)
    records.log_input("laten", laten_rec)
    logged = records.current()["inputs"]
    assert logged == {"laten": {"path": str(laten_rec), "sha256": records.record_digest(laten_rec)}}

    src, out = _chapter(tmp_path, "distillation", {}, reads=["laten"], inputs=logged)
    assert stale_reason(src, out, tmp_path) is None
    assert stale_reason(laten_src, laten_out, tmp_path) is None  # reading it does not make laten stale
    laten_rec.write_text(json.dumps({"models": {}, "metrics": {"scorecard": []}}))  # laten executed again
    assert stale_reason(src, out, tmp_path) == "its input record laten.record.json changed"
    _age(laten_rec, -100)  # newer, yet the same content: up to date
    src, out = _chapter(tmp_path, "distillation", {}, reads=["laten"],
                        inputs={"laten": {"sha256": records.record_digest(laten_rec)}})
    assert stale_reason(src, out, tmp_path) is None
    laten_rec.unlink()  # it read a record that is gone
    assert stale_reason(src, out, tmp_path) == "its input record laten.record.json changed"
    # declared but never logged (a record from before the chapter logged its inputs): not known to match
    src, out = _chapter(tmp_path, "distillation", {}, reads=["laten"])
    assert stale_reason(src, out, tmp_path) == "its input record laten.record.json changed"
    # logged but not declared counts too; a record that did not exist when read, and still does not, is fine
    src, out = _chapter(tmp_path, "other", {}, inputs={"laten": {"sha256": None}, "postalign": {"sha256": "0" * 16}})
    assert stale_reason(src, out, tmp_path) == "its input record postalign.record.json changed"


def test_run_notebook_keeps_the_inputs_a_chapter_logged(tmp_path, monkeypatch):
    from pktlib import records

    src = tmp_path / "a.ipynb"
    nbformat.write(nbformat.v4.new_notebook(), src)
    (tmp_path / "laten.record.json").write_text("{}")

    def execute(notebook, output, parameters, *, cwd, progress, sidecar):  # the child's and kernel's side, in process
        monkeypatch.setenv(records.SIDECAR_ENV, str(sidecar))
        records.log_input("laten", tmp_path / "laten.record.json")
        output.write_text(src.read_text())
        return 1.0

    monkeypatch.setattr(records, "_execute_measured", execute)
    rec = records.run_notebook(src, tmp_path / "book" / "a.ipynb", progress=False)
    digest = records.record_digest(tmp_path / "laten.record.json")
    assert rec.inputs == {"laten": {"path": str(tmp_path / "laten.record.json"), "sha256": digest}}
    assert json.loads((tmp_path / "book" / "a.record.json").read_text())["inputs"]["laten"]["sha256"] == digest


def test_stale_when_run_with_non_default_parameters(tmp_path):
    from pktlib.book.build import non_default_chapters

    src, out = _chapter(tmp_path, "a", {})
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("limit = 64\nbackends = ['hf', 'vllm']", metadata={"tags": ["parameters"]})]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, src)
    rec = record_path(out)
    rec.write_text(json.dumps({"models": {}, "parameters": {"limit": 64, "backends": ["hf", "vllm"]}}))
    assert stale_reason(src, out, tmp_path) is None  # the defaults
    rec.write_text(json.dumps({"models": {}, "parameters": {"limit": 2, "backends": ["hf", "vllm"]}}))
    assert stale_reason(src, out, tmp_path) == ("it ran with non-default parameters: limit=2 (default 64) "
                                                "(--keep-params keeps it)")
    assert stale_reason(src, out, tmp_path, keep_params=True) is None
    (tmp_path / "_toc.yml").write_text("format: jb-book\nroot: intro\nchapters:\n- file: book/a\n")
    assert non_default_chapters(tmp_path) == [f"{out} ran with limit=2 (default 64)"]


def test_optional_chapters_run_on_request_and_join_the_toc_once_executed(tmp_path, monkeypatch, capsys):
    import yaml

    from pktlib.book import build as book

    _chapter(tmp_path, "a", {})
    src, out = _chapter(tmp_path, "real", {})
    nb = nbformat.read(src, as_version=4)
    nb.metadata["pktlib"] = {"optional": "the real pair (make real-pair)"}
    nbformat.write(nb, src)
    (tmp_path / "_toc.yml").write_text(
        "format: jb-book\nroot: intro\nparts:\n- caption: Main\n  chapters:\n  - file: book/a\n"
        "- caption: A real pair\n  chapters:\n  - file: book/real\n")
    assert book.optional_need(src) == "the real pair (make real-pair)" and book.optional_need(tmp_path / "notebooks" / "a.ipynb") is None
    ran = []
    monkeypatch.setattr(book, "run_notebook", lambda s, o, cwd=None, progress=True: ran.append(s.stem))
    book.execute_all(tmp_path, force=True)
    assert ran == ["a"] and "real: optional (needs the real pair (make real-pair))" in capsys.readouterr().out
    book.execute_all(tmp_path, force=True, optional=True)
    assert ran == ["a", "real"]
    book.execute_all(tmp_path, force=True, only=["real"])
    assert ran == ["a", "real", "real"]
    # executed (record present): the toc is _toc.yml itself; not executed: a copy without it and its empty part
    assert book.book_toc(tmp_path) == (tmp_path / "_toc.yml", [])
    record_path(out).unlink()
    toc_file, left_out = book.book_toc(tmp_path)
    assert left_out == ["book/real"] and toc_file == tmp_path / "_build" / "_toc.yml"
    toc = yaml.safe_load(toc_file.read_text())
    assert toc["parts"] == [{"caption": "Main", "chapters": [{"file": "book/a"}]}] and toc["root"] == "intro"


def _toc(root: Path, names: list[str]) -> None:
    (root / "_toc.yml").write_text("format: jb-book\nroot: intro\nchapters:\n"
                                   + "".join(f"- file: book/{n}\n" for n in names))


def test_parallel_execution_overlaps_chapters_and_waits_for_what_each_reads(tmp_path, monkeypatch):
    import threading

    from pktlib.book import build as book
    from pktlib.errors import PktError

    # a and b are independent; c reads a's record; the summary reads everything
    _chapter(tmp_path, "a", {})
    _chapter(tmp_path, "b", {})
    _chapter(tmp_path, "c", {}, reads=["a"], inputs={})
    _chapter(tmp_path, "summary", {}, summary=True)
    _toc(tmp_path, ["a", "b", "c", "summary"])
    assert book.chapter_dependencies([tmp_path / "notebooks" / f"{n}.ipynb" for n in ("a", "b", "c", "summary")]) == {
        "a": set(), "b": set(), "c": {"a"}, "summary": {"a", "b", "c"}}
    b_started, events, reasons = threading.Event(), [], {}
    stale = book.stale_reason

    def record_reason(src, out, root, **kw):
        reasons[src.stem] = stale(src, out, root, **kw)
        return reasons[src.stem]

    def run(src, out, cwd=None, progress=True):
        events.append(("start", src.stem, progress))
        if src.stem == "b":
            b_started.set()
        if src.stem == "a":  # a finishes only once b runs beside it: with one job at a time this times out
            assert b_started.wait(timeout=30), "b did not start while a was running"
            record_path(out).write_text(json.dumps({"models": {}, "new": True}))
        events.append(("end", src.stem))

    monkeypatch.setattr(book, "run_notebook", run)
    book.execute_all(tmp_path, force=True, jobs=2)
    order = [(e[0], e[1]) for e in events]
    assert order.index(("start", "b")) < order.index(("end", "a"))  # overlapped
    assert order.index(("end", "a")) < order.index(("start", "c"))  # c waited for the record it reads
    assert order.index(("start", "summary")) > max(order.index(("end", n)) for n in "abc")
    assert all(e[2] is False for e in events if e[0] == "start")  # no progress bars from two processes at once
    # staleness is judged when a chapter starts: c's input changed while it waited
    events.clear()
    monkeypatch.setattr(book, "stale_reason", record_reason)
    b_started.set()
    book.execute_all(tmp_path, jobs=2)
    assert reasons["c"] == "its input record a.record.json changed"

    def fail_a(src, out, cwd=None, progress=True):
        events.append(("start", src.stem))
        if src.stem == "a":
            raise PktError("a failed")

    events.clear()
    monkeypatch.setattr(book, "run_notebook", fail_a)
    with pytest.raises(PktError, match="a failed"):
        book.execute_all(tmp_path, force=True, jobs=2)
    # b ran beside a; nothing that reads a (c, the summary) was started after it failed
    assert {e[1] for e in events} == {"a", "b"}
    with pytest.raises(PktError, match="jobs must be >= 1"):
        book.execute_all(tmp_path, jobs=0)
