"""The book as its readers see it: notebook shaping at build time (pktlib.book.sphinx_ext), the
results dashboard (pktlib.dashboard, pktlib.plots.results_dashboard), the neuron explorer
(pktlib.explorer) and the offline assets (pktlib.book.assets)."""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest

from pktlib.errors import PktError

# ================================================================================ notebook shaping


def _code(source, outputs=(), tags=()):
    return {"cell_type": "code", "source": source, "metadata": {"tags": list(tags)} if tags else {},
            "outputs": list(outputs), "execution_count": 1}


def _md(source):
    return {"cell_type": "markdown", "source": source, "metadata": {}}


PNG = {"output_type": "display_data", "data": {"image/png": "iVBORw0KGgo=", "text/plain": "<Figure>"}, "metadata": {}}
BAR = {"output_type": "display_data", "data": {
    "text/plain": "attributing:  40%|####      | 26/64 [00:01<00:02, 17.2it/s]",
    "application/vnd.jupyter.widget-view+json": {"model_id": "abc", "version_major": 2, "version_minor": 0}}}
STREAM_BAR = {"output_type": "stream", "name": "stdout", "text": "100%|##########| 64/64 [00:03<00:00, 20.1it/s]\n"}
TABLE = {"output_type": "execute_result", "data": {"text/plain": "   a\n0  1", "text/html": "<table></table>"}}


def _notebook():
    return {"cells": [
        _md("# Delta ranges\n\nHow large are the deltas?"),
        _code("import numpy as np"),
        _code('preset = "default"', tags=["parameters"]),
        _code('preset = "tiny"', tags=["injected-parameters"]),
        _code("pair = load()", outputs=[BAR, TABLE]),
        _md("## The deltas"),
        _code("fig = plots.delta_hist(d)", outputs=[STREAM_BAR, PNG]),
        _code("table", outputs=[TABLE]),
        _code("fig, ax = plt.subplots()  # the ratios", outputs=[PNG]),
        _code("fig = other()", outputs=[PNG], tags=["remove-input"]),
    ], "metadata": {}, "nbformat": 4, "nbformat_minor": 5}


def test_clean_notebook_collapses_setup_drops_bars_and_captions_figures():
    from pktlib.book.sphinx_ext import clean_notebook

    nb = _notebook()
    warnings = clean_notebook(nb, "delta_ranges", [
        {"match": r"delta_hist", "caption": "SFT deltas.", "paper": "Figure 7"},
        {"match": r"subplots", "caption": "Ratios."},
        {"match": r"never_drawn", "caption": "Nothing."},
    ])
    tags = [c["metadata"].get("tags", []) for c in nb["cells"]]
    assert tags[1] == ["hide-cell"] and tags[2] == ["parameters", "hide-cell"]
    assert tags[3] == ["injected-parameters", "hide-cell"]
    assert tags[4] == ["hide-input"]  # a set-up cell with an output keeps the output visible
    assert tags[6] == ["hide-input"] and tags[8] == ["hide-input"]  # figure cells: code collapsed
    assert tags[7] == []  # an ordinary cell after the set-up is untouched
    assert tags[9] == ["remove-input"]  # the notebook's own choice stays
    # progress bars go (widget and stream alike); the table and the figures stay
    assert nb["cells"][4]["outputs"] == [TABLE]
    assert nb["cells"][6]["outputs"] == [PNG]
    fig = nb["cells"][6]["metadata"]["mystnb"]["figure"]
    assert fig == {"caption": "SFT deltas. Mirrors the paper's Figure 7.", "name": "fig-delta_ranges-1"}
    assert nb["cells"][8]["metadata"]["mystnb"]["figure"]["caption"] == "Ratios."
    assert any("never_drawn" in w for w in warnings)
    assert any("cell 9" in w and "no caption" in w for w in warnings)  # the uncaptioned figure
    assert len(warnings) == 2, warnings


def test_captioned_figure_cell_keeps_its_table_outside_the_figure():
    from pktlib.book.sphinx_ext import clean_notebook

    nb = {"cells": [_md("# T\n\nWhy?"), _md("## A"),
                    _code("ax = rel.plot.bar()\nrel", outputs=[TABLE, PNG, STREAM_BAR, {"output_type": "stream", "name": "stdout", "text": "done"}])],
          "metadata": {}}
    assert clean_notebook(nb, "ch", [{"match": "rel.plot", "caption": "Sizes."}]) == []
    cells = nb["cells"]
    assert len(cells) == 5
    assert cells[2]["outputs"] == [TABLE] and cells[2]["metadata"]["tags"] == ["remove-input"] and cells[2]["source"] == ""
    assert cells[3]["outputs"] == [PNG] and cells[3]["metadata"]["mystnb"]["figure"]["caption"] == "Sizes."
    assert cells[4]["outputs"] == [{"output_type": "stream", "name": "stdout", "text": "done"}]  # the bar is gone
    assert "mystnb" not in cells[2]["metadata"] and "mystnb" not in cells[4]["metadata"]


def test_progress_detection_is_tight():
    from pktlib.book.sphinx_ext import is_progress_output

    assert is_progress_output(BAR) and is_progress_output(STREAM_BAR)
    for text in ("accuracy 40% | 26/64 correct", "| 50% | 1/2 |", "loss 0.31, 100 steps"):
        assert not is_progress_output({"output_type": "stream", "name": "stdout", "text": text}), text
    assert not is_progress_output(PNG)


def test_load_captions_errors_name_the_file(tmp_path):
    from pktlib.book.sphinx_ext import load_captions

    p = tmp_path / "figures.yml"
    assert load_captions(p) == {}
    p.write_text("laten:\n  - match: sweep\n    caption: The sweep.\n")
    assert load_captions(p) == {"laten": [{"match": "sweep", "caption": "The sweep."}]}
    p.write_text("laten:\n  - match: sweep\n")
    with pytest.raises(PktError, match="laten entry 1 needs 'match' and 'caption'"):
        load_captions(p)
    p.write_text("laten:\n  - match: '(unclosed'\n    caption: x\n")
    with pytest.raises(PktError, match="bad regex"):
        load_captions(p)
    p.write_text("laten: [\n")
    with pytest.raises(PktError, match=r"figures.yml:\d+: malformed YAML"):
        load_captions(p)


def test_book_captions_file_is_valid():
    from pktlib.book.sphinx_ext import load_captions

    caps = load_captions(Path(__file__).resolve().parents[1] / "book" / "figures.yml")
    notebooks = {p.stem for p in (Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb")}
    assert caps and set(caps) <= notebooks, set(caps) - notebooks


# ================================================================================ dashboard

RECORDS = {
    "postalign": {"metrics": {"scorecard": [
        {"method": "student", "task": "pocket-math", "score": 30.0, "pair": "pocket default: teacher-chat -> student-chat"},
        {"method": "postalign-seeking-n1000", "task": "pocket-math", "score": 38.0, "pair": "pocket default"},
        {"method": "postalign-pissa-n1000", "task": "pocket-math", "score": 41.0, "pair": "pocket default"},
        {"method": "student", "task": "gsm8k", "score": 16.0, "pair": "llama-2-13b-7b-chat, 3 seeds"},
        {"method": "postalign-pissa-n1000", "task": "gsm8k", "score": 28.0, "pair": "llama-2-13b-7b-chat, 3 seeds"},
        {"method": "teacher", "task": "pocket-math", "score": 60.0, "pair": "pocket default"},  # not a transfer
    ]}},
    "laten": {"metrics": {"scorecard": [
        {"method": "student", "task": "pocket-code", "score": 20.0, "pair": "pocket"},
        {"method": "laten", "task": "pocket-code", "score": 22.0, "pair": "pocket"},
        {"method": "laten", "task": "pocket-code", "score": 26.0, "pair": "pocket"},
        {"method": "laten", "task": "pocket-math", "score": 27.0, "pair": "pocket"},  # student from postalign
        {"method": "laten", "task": "pocket-knowledge", "score": 27.0, "pair": "pocket"},  # no student anywhere
    ]}},
}


def test_gains_over_the_student():
    from pktlib.dashboard import POCKET, gains

    g = {(x.method, x.family, x.source): x for x in gains(RECORDS)}
    assert g["postalign-pissa-n1000", "math", POCKET].gain == 11.0
    assert g["postalign-pissa-n1000", "math", "llama-2-13b-7b-chat"].gain == 12.0
    code = g["laten", "code", POCKET]
    assert code.gain == 4.0 and code.n_rows == 2 and code.spread == pytest.approx(2.8284, abs=1e-3)
    assert g["laten", "math", POCKET].gain == -3.0 and g["laten", "math", POCKET].records == ["laten"]
    assert ("laten", "knowledge", POCKET) not in g  # no student score to compare with
    assert not any(m == "teacher" for m, _, _ in g)
    # the paper's bars: Table 1 gains, code = mean of HumanEval and MBPP
    paper = g["laten", "code", "paper: Llama-2 13B→7B"]
    assert paper.gain == pytest.approx(((14.63 - 14.05) + (18.20 - 17.80)) / 2)
    assert g["laten", "math", "paper: Qwen2.5 3B→1.5B"].gain == pytest.approx(62.32 - 62.02)
    assert gains({}, paper=False) == []


def test_results_dashboard_draws_every_bar():
    import matplotlib

    matplotlib.use("Agg")
    from pktlib.dashboard import PARADIGMS, gains
    from pktlib.plots import results_dashboard

    bars = gains(RECORDS)
    fig = results_dashboard(bars)
    axes = fig.axes
    assert len(axes) == len(PARADIGMS) * 3
    drawn = sorted(round(p.get_width(), 6) for ax in axes for p in ax.patches)
    assert drawn == sorted(round(b.gain, 6) for b in bars)  # one bar per gain, of its length
    labels = {t.get_text() for ax in axes for t in ax.texts}
    assert "+11.0" in labels and "-3.0" in labels
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend[:2] == ["paper: Llama-2 13B→7B", "paper: Qwen2.5 3B→1.5B"] and "pocket pair" in legend
    assert axes[0].get_title() == "knowledge"
    assert [t.get_text() for t in axes[0].get_yticklabels()] == list(next(iter(PARADIGMS.values())).values())


def test_write_dashboard_files(tmp_path):
    from pktlib.book.sphinx_ext import load_all_records, write_dashboard

    recs = tmp_path / "book"
    recs.mkdir()
    for stem, r in RECORDS.items():
        (recs / f"{stem}.record.json").write_text(json.dumps(r))
    (recs / "scorecard.record.json").write_text(json.dumps({"metrics": {}}))
    # a real pair's run of the LaTen chapter, kept apart from the pocket pair's
    run = tmp_path / "runs" / "scale" / "qwen2.5-3b-1.5b-instruct"
    run.mkdir(parents=True)
    (run / "laten.record.json").write_text(json.dumps({"metrics": {"scorecard": [
        {"method": "student", "task": "gsm8k", "score": 60.0, "pair": "qwen2.5-3b-1.5b-instruct"},
        {"method": "laten", "task": "gsm8k", "score": 62.5, "pair": "qwen2.5-3b-1.5b-instruct"}]}}))
    dirs = [recs, tmp_path / "runs" / "scale", tmp_path / "absent"]
    assert set(load_all_records(dirs)) == {"laten", "postalign", "scale/qwen2.5-3b-1.5b-instruct/laten"}
    png, md = write_dashboard(dirs, recs / "_generated")
    assert png.read_bytes()[:4] == b"\x89PNG"
    text = md.read_text()
    assert text.startswith(":::{figure} _generated/dashboard.png")
    assert "[laten](laten.ipynb)" in text and "[postalign](postalign.ipynb)" in text
    assert "`scale/qwen2.5-3b-1.5b-instruct/laten`" in text
    assert "Real pairs with records: llama-2-13b-7b-chat, qwen2.5-3b-1.5b-instruct" in text
    _, md2 = write_dashboard([tmp_path / "none"], tmp_path / "out")  # no records: paper bars only
    assert "no chapter yet" in md2.read_text() and "run it on your pair" in md2.read_text()


# ================================================================================ explorer


@pytest.fixture(scope="module")
def explorer_inputs():
    from conftest import PAIRS, make_model, make_tokenizer

    from pktlib import attribution as A

    tok = make_tokenizer()
    models = {"teacher": (make_model("llama", tokenizer=tok, n_layers=3), tok),
              "student": (make_model("qwen2", tokenizer=tok, n_layers=2, hidden_size=32, intermediate_size=48), tok)}
    pairs = {"math": PAIRS * 2, "knowledge": PAIRS[::-1]}
    attr = {(f, r): A.attribute(m, t, pairs[f], per_example=True, progress=False)
            for f in pairs for r, (m, t) in models.items()}
    return models, attr, pairs


def test_explorer_data_matches_the_attribution(explorer_inputs):
    import torch

    from pktlib import attribution as A
    from pktlib.attribution import LogitLens
    from pktlib.explorer import FORMAT, explorer_data
    from pktlib.models import spec

    models, attr, pairs = explorer_inputs
    d = explorer_data(models, attr, pairs, k_neurons=3, n_tokens=4, n_examples=2)
    assert d["format"] == FORMAT and d["families"] == ["math", "knowledge"]
    assert json.loads(json.dumps(d)) == d  # JSON-ready
    model, tok = models["student"]
    a = attr["math", "student"]
    rows = d["models"]["student"]["kinds"]["ffn"]["layers"]["1"]
    # the located neurons: the union of each family's top 3, best first
    union = set(a.ffn[1].topk(3).indices.tolist()) | set(attr["knowledge", "student"].ffn[1].topk(3).indices.tolist())
    assert {r["neuron"] for r in rows} == union
    r = rows[0]
    assert r["score"]["math"] == pytest.approx(float(a.ffn[1, r["neuron"]]), abs=1e-4)
    # promoted/suppressed: the extreme logit-lens logits of the neuron's down_proj column
    s = spec(model)
    with torch.no_grad():
        u = LogitLens.of(model, s).directions(s.weight(model, 1, "down_proj")[:, [r["neuron"]]])[:, 0]
    assert [t for t, _ in r["promoted"]] == [tok.decode([int(i)]) for i in u.topk(4).indices]
    assert [t for t, _ in r["suppressed"]] == [tok.decode([int(i)]) for i in (-u).topk(4).indices]
    assert r["promoted"][0][1] == pytest.approx(float(u.max()), abs=1e-3)
    assert r["suppressed"][0][1] == pytest.approx(float(u.min()), abs=1e-3)
    # examples where it acts: the best per-example scores, positive only
    per = a.ffn_per_example[:, 1, r["neuron"]]
    want = [[int(i), round(float(v), 4)] for v, i in zip(*per.topk(2)) if float(v) > 0]
    assert r["examples"]["math"] == want
    assert d["examples"]["math"][0]["target"]["student"] == tok.decode([int(a.targets[0])])
    assert d["models"]["teacher"]["n_layers"] == 3 and d["models"]["student"]["kinds"]["attn"]["n_neurons"] == 32
    with pytest.raises(PktError, match="no per-example scores"):
        flat = {k: A.Attribution(v.ffn, v.attn, v.ffn_layers, v.attn_layers, v.targets) for k, v in attr.items()}
        explorer_data(models, flat, pairs)
    with pytest.raises(PktError, match="4 examples but 2 pairs"):
        explorer_data(models, attr, {"math": pairs["math"][:2]})


def test_explorer_views(explorer_inputs):
    from pktlib.explorer import NeuronExplorer, best_layer, neuron_view, ranked

    models, attr, pairs = explorer_inputs
    ex = NeuronExplorer.from_attribution(models, attr, pairs, k_neurons=2)
    bundle = ex._repr_mimebundle_()
    html = bundle["text/html"]
    # self-contained: the data and the viewer inline, nothing fetched
    assert 'class="pkt-explorer-data"' in html and "document.querySelectorAll" in html
    assert "src=" not in html and "http" not in html.split("<script>")[1][:2000]
    payload = html.split('class="pkt-explorer-data">')[1].split("</script>")[0]
    assert json.loads(payload.replace("<\\/", "</")) == ex.data
    # the book redraws an explorer from its data with the current viewer
    from pktlib.book.sphinx_ext import clean_notebook

    old = html.replace("document.querySelectorAll", "/* an older viewer */ document.querySelectorAll")
    nb = {"cells": [_md("# T\n\nWhy?"), _md("## A"), _code("ex", outputs=[
        {"output_type": "execute_result", "data": {"text/html": old, "text/plain": "x"}}])], "metadata": {}}
    clean_notebook(nb, "ch")
    assert nb["cells"][2]["outputs"][0]["data"]["text/html"] == html
    # Jupyter gets the live widget; changing the controls redraws the view from the data
    assert "application/vnd.jupyter.widget-view+json" in bundle
    w = ex.widget()
    (role_w, fam_w), kind_w, (layer_w, neuron_w), out = w.children[0].children, w.children[1], w.children[2].children, w.children[3]
    # it opens on the first family's best neuron
    assert layer_w.value == best_layer(ex.data, "teacher", "ffn", "math") and neuron_w.value == 0
    best = max((r["score"]["math"], int(l)) for l, rows in ex.data["models"]["teacher"]["kinds"]["ffn"]["layers"].items()
               for r in rows)
    assert layer_w.value == best[1] and f"summed score on math {best[0]:+.3f}" in out.value
    role_w.value, kind_w.value, layer_w.value = "student", "attn", 1
    fam_w.value = "knowledge"
    neuron_w.value = 1
    assert out.value == neuron_view(ex.data, "student", "attn", 1, 1, "knowledge")
    rows = ranked(ex.data, "student", "attn", 1, "knowledge")
    assert [r["score"]["knowledge"] for r in rows] == sorted((r["score"]["knowledge"] for r in rows), reverse=True)
    assert f"neuron {rows[1]['neuron']}" in out.value and "attention layer 1" in out.value
    assert list(layer_w.options) == [0, 1]
    role_w.value = "teacher"
    assert list(layer_w.options) == [0, 1, 2]


# ================================================================================ offline assets


def _tarball(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_assets_install_verifies_and_extracts_only_what_is_kept(tmp_path):
    from pktlib.book.assets import NpmAsset, check, install, sri_sha512

    tgz = _tarball({"package/package.json": b"{}", "package/dist/app.js": b"x=1", "package/dist/app.js.map": b"{}",
                    "package/README.md": b"hi"})
    good = NpmAsset("@scope/lib", "1.2.3", sri_sha512(tgz), ("package.json", "dist/app.js"))
    calls = []

    def fetch(asset, folder):
        calls.append(asset.name)
        p = folder / "lib.tgz"
        p.write_bytes(tgz)
        return p

    dest = tmp_path / "vendor"
    assert check(dest, [good]) == [f"@scope/lib@1.2.3 is not installed in {dest} (run `make assets`)"]
    assert install(dest, [good], fetch=fetch, quiet=True) == ["@scope/lib"]
    files = sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file())
    assert files == ["@scope/lib/.pkt-asset.json", "@scope/lib/dist/app.js", "@scope/lib/package.json"]
    assert check(dest, [good]) == []
    assert install(dest, [good], fetch=fetch, quiet=True) == [] and calls == ["@scope/lib"]  # pinned and present

    # a tarball whose hash differs from the pin: refused, the installed copy stays as it was
    bad = NpmAsset("@scope/lib", "1.2.4", sri_sha512(b"something else"), good.keep)
    with pytest.raises(PktError, match="differs from the pinned"):
        install(dest, [bad], fetch=fetch, quiet=True)
    assert (dest / "@scope/lib/dist/app.js").read_bytes() == b"x=1" and check(dest, [good]) == []
    assert sorted(p.name for p in dest.iterdir()) == ["@scope"]  # no temporary folder left behind

    # a member that would escape the folder, and a kept file the tarball lacks
    evil = _tarball({"package/package.json": b"{}", "package/../../evil.js": b"x"})
    esc = NpmAsset("evil", "1.0.0", sri_sha512(evil), ("package.json", "../../evil.js"))
    with pytest.raises(PktError, match="refusing tar member"):
        install(dest, [esc], fetch=lambda a, f: (f / "e.tgz", (f / "e.tgz").write_bytes(evil))[0], quiet=True)
    missing = NpmAsset("lib2", "1.0.0", sri_sha512(tgz), ("package.json", "dist/other.js"))
    with pytest.raises(PktError, match=r"lacks \['dist/other.js'\]"):
        install(dest, [missing], fetch=fetch, quiet=True)
    assert not (tmp_path / "evil.js").exists() and not (dest / "evil").exists() and not (dest / "lib2").exists()
