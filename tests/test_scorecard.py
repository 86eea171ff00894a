"""The scorecard (pktlib.scorecard): records -> per-family tables beside the paper."""
from __future__ import annotations


def test_scorecard_tables_from_records():
    from pktlib.scorecard import PAPER, scorecard_tables, to_markdown

    records = {
        "laten_chapter": {"metrics": {"scorecard": [
            {"method": "laten", "task": "pocket-math", "score": 31.5, "n": 200, "pair": "pocket T->S",
             "effect": 1.5, "ci": [-0.25, 3.25], "p": 0.0123, "seeds": 3},
            {"method": "laten", "task": "pocket-code", "score": 12.0, "effect": "not a number", "p": 0.5},
            {"method": "bad row"},  # malformed rows are skipped
        ]}},
        "baselines": {"metrics": {"scorecard": {"student-chat": {"pocket-math": 20.0}}}},
        "no_scores": {"metrics": {"other": 1}},
        "broken": {},
    }
    t = scorecard_tables(records)
    assert set(t) == {"knowledge", "math", "code"}
    math_t = t["math"]
    laten = math_t[math_t["method"] == "LaTen (Pre-Align)"].iloc[0]
    # the paper's numbers land in the column of their pair and task
    assert laten["project score"] == 31.5
    # the chapter's comparison with the student: effect, 95% interval, McNemar p, seeds
    assert laten["vs student"] == "+1.5 [-0.2, +3.2], p = 0.012 (3 seeds)"
    assert t["code"][t["code"]["method"] == "LaTen (Pre-Align)"].iloc[0]["vs student"] is None  # malformed: left out
    assert laten["paper: gsm8k (Llama-2-13b-chat -> Llama-2-7b-chat)"] == PAPER[
        "Llama-2-13b-chat -> Llama-2-7b-chat (Table 1)"]["laten"]["gsm8k"]
    assert laten["paper: gsm8k (Qwen2.5-3B -> Qwen2.5-1.5B)"] == PAPER["Qwen2.5-3B -> Qwen2.5-1.5B (Table 8)"]["laten"]["gsm8k"]
    assert laten["source"] == "[laten_chapter](laten_chapter.ipynb) · {download}`record <laten_chapter.record.json>`"
    plain = scorecard_tables(records, record_style="link")["math"]
    assert "[record](laten_chapter.record.json)" in plain[plain["method"] == "LaTen (Pre-Align)"].iloc[0]["source"]
    student = math_t[math_t["method"].str.startswith("Student")].iloc[0]
    assert student["project score"] == 20.0  # alias student-chat -> student
    # Knowledge has no project scores: paper numbers present, project cells empty.
    k = t["knowledge"]
    assert k["project score"].isna().all() and (k["paper: mmlu (Llama-2-13b-chat -> Llama-2-7b-chat)"].notna()).sum() == 9
    code = t["code"]
    assert {"paper: humaneval (Llama-2-13b-chat -> Llama-2-7b-chat)", "paper: mbpp (Llama-2-13b-chat -> Llama-2-7b-chat)"} <= set(code.columns)
    md = to_markdown(math_t)
    assert "| LaTen (Pre-Align) |" in md and "31.50" in md
    assert scorecard_tables({})["math"]["project score"].isna().all()


def test_scorecard_names_protocols_and_sets_only_the_papers_protocol_beside_the_paper():
    from pktlib.scorecard import collect_scores, scorecard_tables

    records = {"evaluation": {"metrics": {"scorecard": [
        {"method": "student", "task": "gsm8k", "score": 3.0, "protocol": "open-instruct", "pair": "SmolLM2"},
        {"method": "student", "task": "gsm8k", "score": 5.0, "protocol": "pkt", "pair": "SmolLM2"},
        {"method": "student", "task": "pocket-math", "score": 40.0},  # no protocol named: the project's
    ]}}}
    assert [r.protocol for r in collect_scores(records)] == ["open-instruct", "pkt", "pkt"]
    t = scorecard_tables(records)["math"]
    rows = t[t["method"].str.startswith("Student")].set_index("project score")
    paper = "paper: gsm8k (Llama-2-13b-chat -> Llama-2-7b-chat)"
    assert list(t.columns).index("protocol") == list(t.columns).index("project task") + 1
    assert rows.loc[3.0, "protocol"] == "open-instruct" and rows.loc[3.0, paper] == 16.07  # like for like
    assert rows.loc[5.0, "protocol"] == "pkt" and rows.loc[5.0, paper] != rows.loc[5.0, paper]  # NaN: not comparable
    assert rows.loc[40.0, "protocol"] == "pkt" and rows.loc[40.0, paper] == 16.07  # the pocket analogue


def _record(folder, stem, pair_seed, rows, preset="default"):
    import json
    folder.mkdir(parents=True, exist_ok=True)
    params = {} if pair_seed is None else {"pair_seed": pair_seed, "preset": preset}
    (folder / f"{stem}.record.json").write_text(json.dumps({"parameters": params, "metrics": {"scorecard": rows}}))


def _row(method, task, score, effect, p, verdict, seeds=3):
    return {"method": method, "task": task, "score": score, "n": 300, "effect": effect, "ci": [effect - 1, effect + 1],
            "p": p, "seeds": seeds, "verdict": verdict}


def test_comparisons_side_by_side_across_pocket_pair_builds(tmp_path):
    import pandas as pd
    import pytest

    from pktlib.errors import PktError
    from pktlib.scorecard import across_builds, records_by_build, to_markdown

    book, other = tmp_path / "book", tmp_path / "runs" / "pocket-seed-1"
    _record(book, "laten", 0, [_row("laten", "pocket-math", 31.0, 0.0, 1.0, "same answers"),
                               {"method": "student", "task": "pocket-math", "score": 31.0, "n": 300}])
    _record(book, "postalign", 0, [_row("postalign-seeking-n1000", "pocket-code", 40.0, 3.0, 0.01, "better"),
                                   _row("postalign-random-n1000", "pocket-code", 38.0, 1.0, 0.2, "n.s.")])
    _record(book, "real_pair_laten", None, [_row("laten", "gsm8k", 5.0, 0.0, 1.0, "same answers")])  # not pocket
    _record(other, "laten", 1, [_row("laten", "pocket-math", 29.0, 0.0, 1.0, "same answers")])
    _record(other, "postalign", 1, [_row("postalign-seeking-n1000", "pocket-code", 36.0, 1.5, 0.3, "n.s.")])
    builds = records_by_build([book, tmp_path / "runs" / "pocket-seed-*", tmp_path / "missing"])
    # by the records' own parameters
    assert list(builds) == ["default seed 0", "default seed 1"] and sorted(builds["default seed 0"]) == ["laten", "postalign"]
    t = across_builds(builds)
    # METHODS order within a chapter; rows without a comparison (the student) are left out
    assert list(zip(t.chapter, t.method, t["default seed 0: verdict"], t["default seed 1: verdict"].fillna("-"))) == [
        ("laten", "LaTen (Pre-Align)", "same answers", "same answers"),
        ("postalign", "Post-Align, random LoRA, N=1000", "n.s.", "-"),  # seed 1 lacks it
        ("postalign", "Post-Align, Seeking, N=1000", "better", "n.s.")]
    assert t["same verdict"].isna().tolist() == [False, True, False]
    assert t["same verdict"].iloc[0] and not t["same verdict"].iloc[2]
    assert t["default seed 1: vs student"].iloc[2] == "+1.5 [+0.5, +2.5], p = 0.3 (3 seeds)"
    assert t["default seed 0: score"].iloc[2] == 40.0 and pd.isna(t["default seed 1: score"].iloc[1])
    assert "| postalign | Post-Align, Seeking, N=1000 | pocket-code | 40.00 |" in to_markdown(t)
    with pytest.raises(PktError, match=r"at least two pocket-pair builds; found \['default seed 0'\]"):
        across_builds(records_by_build([book]))
    _record(tmp_path / "copy", "laten", 1, [])
    with pytest.raises(PktError, match="two records of chapter 'laten' on the pocket pair default seed 1"):
        records_by_build([book, other, tmp_path / "copy"])
    _record(tmp_path / "tiny", "laten", 1, [], preset="tiny")  # another preset is another build
    assert list(records_by_build([book, other, tmp_path / "tiny"])) == ["default seed 0", "default seed 1", "tiny seed 1"]


def test_the_papers_claims_side_by_side_across_builds(tmp_path):
    import json

    from pktlib.scorecard import PAPER_CLAIMS, claims_by_build, claims_markdown, records_by_build

    def record(folder, stem, seed, metrics):
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{stem}.record.json").write_text(json.dumps({"parameters": {"pair_seed": seed, "preset": "default"},
                                                                "metrics": metrics}))

    book, other = tmp_path / "book", tmp_path / "runs" / "pocket-seed-1"
    record(book, "laten", 0, {"lr_sweep_claim": '\n**The paper\'s claim, "LaTen improves the student, unstably"**: '
                                                "the pocket pair does not show an improvement (sweep)."})
    record(book, "specialist_sources", 0, {"verdict": "The pocket pair agrees with the paper: no help."})
    record(other, "specialist_sources", 1, {"verdict": "The pocket pair disagrees with the paper: it helps."})
    rows = claims_by_build(records_by_build([book, other]))
    assert len(rows) == len(PAPER_CLAIMS) * 2
    got = {(r["chapter"], r["build"]): r["conclusion"] for r in rows}
    assert got["laten", "default seed 0"] == "the pocket pair does not show an improvement (sweep)."  # lead dropped
    assert got["laten", "default seed 1"] is None and got["distillation", "default seed 0"] is None
    assert got["specialist_sources", "default seed 1"] == "The pocket pair disagrees with the paper: it helps."
    md = claims_markdown(rows)
    assert "- **A specialist source does not help** (chapter `specialist_sources`)\n" in md
    assert "  - *default seed 0*: The pocket pair agrees with the paper: no help.\n" in md
    assert "  - *default seed 1*: not run on this build" in md
