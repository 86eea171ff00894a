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


def test_entry_point_in_its_own_process():
    """The installed command's module runs as a program: a user error is one line, exit status 1."""
    r = subprocess.run([sys.executable, "-m", "pktlib.cli", "info", "/no/such/model"], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [r.stderr.strip()] and "model not found" in r.stderr, r.stderr


def test_unknown_command_is_usage_error(pkt):
    assert pkt("frobnicate").code == 2


def test_every_command_has_help(pkt):
    assert pkt("--help").code == 0
    for cmd in ("info", "run", "book", "zoo", "laten", "baseline"):
        r = pkt(cmd, "--help")
        assert r.code == 0 and "Usage" in r.out, (cmd, r.err)


def test_info_prints_spec(pkt, tiny_dir):
    r = pkt("info", tiny_dir)
    assert r.code == 0, r.err
    assert "arch: llama" in r.out and "n_layers: 3" in r.out and "parameters:" in r.out


def test_run_writes_executed_notebook_and_record(pkt, tmp_path, tiny_dir):
    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_code_cell("from pktlib import records"),
        nbformat.v4.new_code_cell("seed = 1\nscale = 2.0\nmodel = ''", metadata={"tags": ["parameters"]}),
        nbformat.v4.new_code_cell("records.log_model('student', model)\nrecords.log_metrics(product=seed * scale)"),
    ]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    src = tmp_path / "nb.ipynb"
    nbformat.write(nb, src)
    out = tmp_path / "book" / "nb.ipynb"
    r = pkt("run", src, "-o", out, "-p", "seed", "3", "-p", "model", tiny_dir)
    assert r.code == 0, r.err
    rec = json.loads((tmp_path / "book" / "nb.record.json").read_text())
    assert rec["metrics"] == {"product": 6.0}
    assert rec["parameters"] == {"seed": 3, "scale": 2.0, "model": str(tiny_dir)}
    assert rec["seed"] == 3
    assert rec["models"]["student"]["source"] == str(tiny_dir)
    assert len(rec["models"]["student"]["weights_sha256"]) == 16
    assert rec["wall_time_s"] > 0 and rec["peak_memory_mb"] > 0
    executed = nbformat.read(out, as_version=4)
    assert any(c.get("metadata", {}).get("tags") == ["injected-parameters"] for c in executed.cells)
    assert not list((tmp_path / "book").glob(".*"))  # no sidecar or partial file left behind
