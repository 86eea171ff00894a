"""The scorecard (pktlib.scorecard): records -> per-family tables beside the paper."""
from __future__ import annotations


def test_scorecard_tables_from_records():
    from pktlib.scorecard import PAPER, scorecard_tables, to_markdown

    records = {
        "laten_chapter": {"metrics": {"scorecard": [
            {"method": "laten", "task": "pocket-math", "score": 31.5, "n": 200, "pair": "pocket T->S"},
            {"method": "laten", "task": "pocket-code", "score": 12.0},
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
