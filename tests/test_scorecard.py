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
