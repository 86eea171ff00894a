import json
import subprocess
import sys

import nbformat
import pytest


@pytest.mark.parametrize("args, message", [
    (["info", "/no/such/model"], "model not found"),
    (["info", "/no/such/model.gguf"], "GGUF file not found"),
    (["run", "/no/such/notebook.ipynb"], "notebook not found"),
    (["run", "nb.ipynb", "-p", "only_name"], "needs NAME VALUE"),
])
def test_user_errors_one_line_no_traceback(pkt, args, message):
    r = pkt(*args)
    assert r.code == 1, r.err
    lines = [l for l in r.err.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], r.err


def test_unknown_command_is_usage_error(pkt):
    assert pkt("frobnicate").code == 2


def test_every_command_has_help(pkt):
    assert pkt("--help").code == 0
    for cmd in ("info", "run", "book", "zoo", "laten", "baseline"):
        r = pkt(cmd, "--help")
        assert r.code == 0 and "Usage" in r.out, (cmd, r.err)


def test_help_keeps_every_bracketed_text(pkt):
    """A help text's "[a, b]" (a list value, a default) is printed, not read as a markup tag and dropped."""
    import re

    import typer

    from pktlib import cli

    def walk(cmd, path):
        yield path, cmd
        for name, sub in getattr(cmd, "commands", {}).items():
            yield from walk(sub, path + [name])

    checked = 0
    for path, cmd in walk(typer.main.get_command(cli.app), []):
        texts = [cmd.help or ""] + [getattr(p, "help", None) or "" for p in cmd.params]
        wanted = [b for t in texts for b in re.findall(r"\[[^\[\]]*\]", " ".join(t.split()))]
        if not wanted:
            continue
        r = pkt(*path, "--help")
        shown = " ".join(r.out.split())
        missing = [b for b in wanted if b not in shown]
        assert r.code == 0 and not missing, (path, missing)
        checked += len(wanted)
    assert checked >= 1  # `pkt run`'s "[a, b] is a list" at least


def test_info_prints_spec(pkt, tiny_dir):
    r = pkt("info", tiny_dir)
    assert r.code == 0, r.err
    assert "arch: llama" in r.out and "n_layers: 3" in r.out and "parameters:" in r.out


def test_run_writes_executed_notebook_and_record(pkt, tmp_path, tiny_dir):
    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_code_cell("from pktlib import records"),
        nbformat.v4.new_code_cell("seed = 1\nscale = 2.0\nmodel = ''\nflag = True", metadata={"tags": ["parameters"]}),
        nbformat.v4.new_code_cell("records.log_model('student', model)\nrecords.log_metrics(product=seed * scale)\n"
                                  "records.log_metrics(flag_is_false=flag is False)"),
    ]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    src = tmp_path / "nb.ipynb"
    nbformat.write(nb, src)
    out = tmp_path / "book" / "nb.ipynb"
    r = pkt("run", src, "-o", out, "-p", "seed", "3", "-p", "model", tiny_dir, "-p", "flag", "False")
    assert r.code == 0, r.err
    rec = json.loads((tmp_path / "book" / "nb.record.json").read_text())
    assert rec["metrics"] == {"product": 6.0, "flag_is_false": True}  # "False" arrives as the bool False
    assert rec["parameters"] == {"seed": 3, "scale": 2.0, "model": str(tiny_dir), "flag": False}
    assert rec["seed"] == 3
    assert rec["models"]["student"]["source"] == str(tiny_dir)
    assert len(rec["models"]["student"]["weights_sha256"]) == 16
    assert rec["wall_time_s"] > 0 and rec["peak_memory_mb"] > 0
    executed = nbformat.read(out, as_version=4)
    assert any(c.get("metadata", {}).get("tags") == ["injected-parameters"] for c in executed.cells)
    assert not list((tmp_path / "book").glob(".*"))  # no sidecar or partial file left behind


# ---------------------------------------------------------------------------- one numeric validator
def _numeric_params():
    import typer

    from pktlib.cli import app

    def walk(cmd, path):  # typer ships its own click: duck typing, not isinstance
        if hasattr(cmd, "commands"):
            for name, sub in cmd.commands.items():
                yield from walk(sub, path + [name])
        else:
            for p in cmd.params:
                if getattr(p, "type_descriptor", None) and p.type_descriptor.annotation in (int, float):
                    yield " ".join(path), p

    return list(walk(typer.main.get_command(app), []))


def test_every_numeric_option_has_the_validator():
    found = _numeric_params()
    assert len(found) > 20
    missing = [(cmd, p.name) for cmd, p in found if not getattr(p.callback, "pkt_numeric", False)]
    assert missing == []


@pytest.mark.parametrize("args, message", [
    (["eval", "m", "--task", "gsm8k", "--batch-size", "0"], "--batch-size must be >= 1, got 0"),
    (["eval", "m", "--task", "gsm8k", "--limit", "-3"], "--limit must be >= 1, got -3"),
    (["eval", "m", "--task", "gsm8k", "--max-new-tokens", "0"], "--max-new-tokens must be >= 1, got 0"),
    (["attribute", "m", "--task", "gsm8k", "--chunk-size", "0"], "--chunk-size must be >= 1, got 0"),
    (["laten", "train", "--teacher", "t", "--student", "s", "--task", "gsm8k", "--out", "o", "--transfer-rate", "1.5"],
     "--transfer-rate must be > 0 and <= 1, got 1.5"),
    (["laten", "train", "--teacher", "t", "--student", "s", "--task", "gsm8k", "--out", "o", "--lr", "0"],
     "--lr must be > 0, got 0"),
    (["laten", "apply", "--teacher", "t", "--student", "s", "--translator", "x", "--task", "gsm8k", "--out", "o",
      "--example-index", "-1"], "--example-index must be >= 0, got -1"),
    (["postalign", "--student", "s", "--task", "gsm8k", "--out", "o", "--dropout", "1"],
     "--dropout must be >= 0 and < 1, got 1"),
    (["baseline", "seeking", "--teacher", "t", "--student", "s", "--task", "gsm8k", "--out", "o", "--rank", "-1"],
     "--rank must be >= 0, got -1"),
    (["zoo", "build", "--seed", "-2"], "--seed must be >= 0, got -2"),
    (["eval", "m", "--task", "gsm8k", "--protocol", "paper"], "unknown evaluation protocol 'paper'"),
])
def test_bad_numbers_are_one_line_errors(pkt, args, message):
    code, _, err = pkt(*args)
    lines = [l for l in err.splitlines() if l.strip()]
    assert code == 1 and len(lines) == 1 and lines[0].startswith(f"error: {message}"), err


def test_eval_batch_size_zero_from_the_shell():
    """The entry point in its own process: a user error is one line on stderr, exit status 1."""
    r = subprocess.run([sys.executable, "-m", "pktlib.cli", "eval", "/no/model", "--task", "gsm8k", "--batch-size",
                        "0"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip() == "error: --batch-size must be >= 1, got 0"


# ---------------------------------------------------------------------------- -p values as papermill reads them
@pytest.mark.parametrize("text, value", [
    ("False", False), ("True", True), ("None", None), ("3", 3), ("-2", -2), ("0.5", 0.5), ("1e-3", 0.001),
    ("false", "false"), ("pocket-math", "pocket-math"), ("[a, b]", ["a", "b"]), ("[1, 2]", [1, 2]),
    ("[3e-5, 3e-05, 1.5E+2, 2.0e-3, -1e2, 1e, e5]", [3e-5, 3e-5, 150.0, 2e-3, -100.0, "1e", "e5"]),
    ('{"k": 1}', {"k": 1}),
])
def test_param_values_parse_like_papermill(text, value):
    from papermill.cli import _resolve_type

    from pktlib.cli import _parse_value

    assert _parse_value(text) == value and type(_parse_value(text)) is type(value)
    if not text.startswith(("[", "{")):
        assert _parse_value(text) == _resolve_type(text)  # papermill's own reading


def _param_notebook(tmp_path):
    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_code_cell("from pktlib import records"),
        nbformat.v4.new_code_cell("flag = True\nn = 2\ntasks = ['a']\nname = 'x'\nlimit = None",
                                  metadata={"tags": ["parameters"]}),
        nbformat.v4.new_code_cell("records.log_metrics(flag_is_false=flag is False, n=n, tasks=tasks, name=name)"),
    ]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    src = tmp_path / "params.ipynb"
    nbformat.write(nb, src)
    return src


@pytest.mark.parametrize("args, message", [
    (["-p", "flag", "yes"], "-p flag 'yes': the notebook's default is True (bool)"),
    (["-p", "n", "two"], "-p n 'two': the notebook's default is 2 (int)"),
    (["-p", "tasks", "b"], "-p tasks 'b': the notebook's default is ['a'] (list)"),
    (["-p", "nope", "1"], "has no parameter 'nope'"),
])
def test_param_type_mismatch_is_refused_before_running(tmp_path, pkt, args, message):
    src = _param_notebook(tmp_path)
    code, _, err = pkt("run", src, "-o", tmp_path / "out.ipynb", *args)
    assert code == 1 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out.ipynb").exists()


# ---------------------------------------------------------------------------- a run's own peak memory
def _memory_notebook(path, mb: int):
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(f"block = b'x' * ({mb} << 20)\nlen(block)")]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)
    return path


def test_peak_memory_is_the_runs_own(tmp_path):
    """A small chapter executed after a large one (one process, as `pkt book` does) records its own peak."""
    from pktlib.records import run_notebook

    big = run_notebook(_memory_notebook(tmp_path / "big.ipynb", 900), tmp_path / "out" / "big.ipynb", progress=False)
    ballast = b"x" * (600 << 20)  # a large caller: a forked child starts its peak at the caller's size
    small = run_notebook(_memory_notebook(tmp_path / "small.ipynb", 1), tmp_path / "out" / "small.ipynb",
                         progress=False)
    del ballast
    assert big.peak_memory_mb > 900, big.peak_memory_mb
    # the small run's peak is its kernel's (~130 MiB), not the big run's nor the caller's
    assert 0 < small.peak_memory_mb < 400, (small.peak_memory_mb, big.peak_memory_mb)


def test_failing_cell_is_one_line_error(tmp_path, pkt):
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("raise ValueError('bad input in cell')")]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, tmp_path / "fail.ipynb")
    code, _, err = pkt("run", tmp_path / "fail.ipynb", "-o", tmp_path / "o" / "fail.ipynb")
    assert code == 1 and "ValueError: bad input in cell" in err and "Traceback" not in err, err
    assert not (tmp_path / "o" / "fail.ipynb").exists()
