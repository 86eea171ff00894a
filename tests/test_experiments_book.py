"""The overview chapters' experiments: the paper's numbers, pairs and tasks, the pocket pair, scale, gains."""
from __future__ import annotations

import pandas as pd
import pytest

from pktlib import zoo
from pktlib.errors import PktError
from pktlib.experiments import gains, overview, paper, pocket, scale
from pktlib.models import reference_spec
from pktlib.scorecard import PAPER, ScoreRow


# ------------------------------------------------------------------------------ the paper's numbers
def test_paper_table_reads_the_scorecard_numbers():
    t = paper.paper_table({("", "student"): "student", ("N=1000", "Seeking"): "postalign-seeking-n1000"})
    assert list(t.index) == ["MMLU", "GSM8K", "HumanEval", "MBPP"]
    assert t.loc["GSM8K", ("", "student")] == PAPER[paper.TABLE1]["student"]["gsm8k"] == 16.07
    assert t.loc["MBPP", ("N=1000", "Seeking")] == 20.60
    with pytest.raises(PktError, match="no scores for"):
        paper.paper_table({"x": "postalign-pissa-small"})
    with pytest.raises(PktError, match="unknown paper reference"):
        paper.paper_gap("Table 99")


def test_paper_gap_is_teacher_minus_student():
    assert paper.paper_gap() == {"MMLU": 8.7, "GSM8K": 4.48, "HumanEval": 4.7, "MBPP": 1.4}
    assert paper.paper_gap("Qwen2.5-3B -> Qwen2.5-1.5B (Table 8)") == {"GSM8K": 11.22}


# ------------------------------------------------------------------------------ pairs and tasks
def test_pair_ratios_of_the_reference_models():
    specs = {n: reference_spec(n) for n in ("Llama-2-13b-chat", "Llama-2-7b-chat")}
    r = overview.pair_ratios(specs, [("Llama-2-13b-chat", "Llama-2-7b-chat")])
    assert r.loc["Llama-2-13b-chat -> Llama-2-7b-chat"].to_dict() == {"layers": 1.25, "hidden": 1.25,
                                                                       "ffn": 13824 / 11008}


def test_split_sizes_counts_examples():
    t = overview.split_sizes(["pocket-math"], ["align", "extract"])
    assert list(t.columns) == ["align", "extract"] and t.loc["pocket-math"].tolist() == [80, 32]


# ------------------------------------------------------------------------------ the pocket pair
def _cards() -> dict:
    def card(params, seconds):
        curve = [[0, 5.0], [2, 3.0]]
        return {"parameters": params, "training": {
            "base": {"steps": 2, "tokens": 100, "seconds": seconds, "loss_curve": curve},
            "chat": {"steps": 1, "tokens": 50, "seconds": 1.04, "loss_curve": [[0, 2.0], [1, 1.5]]}}}
    return {"teacher-chat": card(4000, 10.0), "student-chat": card(1000, 4.0), "teacher-base": card(4000, 10.0)}


def test_pocket_pair_shape_tables():
    cfg = zoo.PRESETS["default"]  # as written (get_preset drops bf16 on CPUs without it)
    specs = {"teacher": cfg.teacher, "student": cfg.student}
    specs = {r: type("S", (), {"n_layers": m.n_layers, "hidden_size": m.hidden_size,
                               "intermediate_size": m.intermediate_size})() for r, m in specs.items()}
    ratios = pocket.llama2_ratios(specs, _cards())
    assert ratios.loc["n_layers", "pocket teacher / student"] == 3.0
    assert ratios.loc["hidden_size", "Llama-2 13B / 7B"] == 1.25
    assert ratios.loc["parameters", "pocket teacher / student"] == 4.0
    assert ratios.loc["FFN / hidden", "pocket teacher / student"] == pytest.approx(688 / 256)
    text = pocket.ratio_reading(ratios)
    assert text.startswith("The pocket teacher has 3x the student's layers, 2x its hidden size")
    stages = pocket.stage_table(cfg)
    assert stages.loc["teacher lr", "base"] == 1e-3 and stages.loc["student lr", "base"] == 2e-3  # width rule
    assert stages.loc["teacher matmuls", "base"] == "bfloat16" and stages.loc["student matmuls", "chat"] == "float32"


def test_pocket_training_tables_from_cards():
    cards = _cards()
    train = pocket.training_table(cards)
    assert list(train.checkpoint) == ["teacher-chat", "teacher-chat", "student-chat", "student-chat"]
    assert train["seconds"].sum() == pytest.approx(10 + 1.0 + 4 + 1.0) and train["final loss"].iloc[1] == 1.5
    curves = pocket.loss_curves(cards)
    assert curves["chat"]["student"] == [(0, 2.0), (1, 1.5)]


def test_pocket_scores_and_gap_reading():
    scores = {c: {"pocket-knowledge": s, "pocket-math": s / 2} for c, s in
              (("teacher-base", 30.0), ("student-base", 25.0), ("teacher-chat", 80.0), ("student-chat", 50.0))}
    table, gap = pocket.score_table(scores)
    assert list(table.index) == pocket.CHECKPOINTS and gap.to_dict() == {"pocket-knowledge": 30.0, "pocket-math": 15.0}
    text = pocket.gap_reading(gap, table, paper.paper_gap())
    assert "pocket-knowledge +30.0 points" in text and "wider on every family" in text
    assert "no wider" in pocket.gap_reading(gap * 0.1, table, paper.paper_gap())


def test_accuracy_by_bin_and_bins():
    df = pd.DataFrame({"model": ["teacher-chat"] * 4 + ["student-chat"] * 4, "popularity": [12, 13, 30, 31] * 2,
                       "correct": [False, True, True, True, False, False, True, False]})
    binned = pocket.popularity_bins(df, (12, 32))
    assert binned["biographies"].cat.categories.size == 4
    table, acc = pocket.accuracy_by(binned, "biographies")
    assert acc.iloc[0].to_dict() == {"student-chat": 0.0, "teacher-chat": 50.0}
    assert acc.iloc[-1].to_dict() == {"student-chat": 50.0, "teacher-chat": 100.0}
    assert ("size", "teacher-chat") in table.columns and "teacher-chat (%)" in table.columns
    assert "the teacher answers 50% and the student 0% correctly" in pocket.popularity_reading(acc)
    kinds = pocket.kind_share_bins(df.rename(columns={"popularity": "kind_frequency"}))
    assert kinds["kind share of problems"].cat.categories.size == 3
    assert "The teacher knows more of the tail" in pocket.kind_reading(acc)
    assert "the student knows more of the tail" in pocket.kind_reading(acc[["teacher-chat", "student-chat"]].rename(
        columns={"teacher-chat": "student-chat", "student-chat": "teacher-chat"}))


# ------------------------------------------------------------------------------ scale
def test_check_cli_args_accepts_pkt_options_and_rejects_others():
    scale.check_cli_args(["pkt", "eval", "m", "--task", "gsm8k", "--limit", "5"])
    scale.check_cli_args(["pkt", "run", "notebooks/x.ipynb", "-p", "lr", "-0.5"])  # a negative value is no option
    with pytest.raises(PktError, match=r"options not accepted by `pkt`: \['--bogus'\]"):
        scale.check_cli_args(["pkt", "eval", "m", "--bogus", "1"])


def test_chapter_and_cli_commands(tmp_path):
    rows, commands = scale.chapter_commands("notebooks", tasks=["gsm8k", "mmlu"], device="cuda", dtype="bfloat16")
    by_name = {r["chapter"]: r for r in rows}
    assert by_name["ethological_similarity"]["runs at scale"] and not by_name["postalign"]["runs at scale"]
    eth = next(c for c in commands["llama2"] if "ethological_similarity" in c)
    assert "-p teacher meta-llama/Llama-2-13b-chat-hf" in eth and "-p task gsm8k,mmlu" in eth and "-p device cuda" in eth
    cli = scale.cli_commands(tasks=["gsm8k", "mmlu"], device="cuda")
    per_task = len(scale.pkt_commands("x", scale.REAL_PAIRS["llama2"], "gsm8k", device="cuda"))
    assert len(cli["llama2"]) == 2 * per_task and len(cli["qwen2.5"]) == per_task


def test_memory_table_and_reading():
    mem = scale.memory_table(dtype="bfloat16")
    t13 = reference_spec("Llama-2-13b-chat")
    assert mem.loc["teacher weights", "llama2"] == pytest.approx(t13.n_parameters * 2 / 2**30)
    sens = scale.sensitivity_bytes(t13)
    assert sens == 4 * 40 * (2 * 5120 * 13824 + 5120 * 5120 + 5120 * 5120)
    assert mem.loc["Delta ranges (4 checkpoints + sensitivity)", "llama2"] == pytest.approx(
        2 * mem.loc["teacher weights", "llama2"] + 2 * mem.loc["student weights", "llama2"] + sens / 2**30)
    assert scale.memory_reading(mem, "bfloat16", limit_gib=1e6) == "Estimated in bfloat16: every step fits one 80 GB GPU."
    text = scale.memory_reading(mem, "bfloat16", limit_gib=10)
    assert "* teacher weights, llama2:" in text and "use a larger GPU" in text
    with pytest.raises(PktError, match="unknown dtype"):
        scale.memory_table(dtype="int8")


# ------------------------------------------------------------------------------ gains
def test_gains_over_student():
    rows = [ScoreRow("student", "pocket-math", 40.0, "a"), ScoreRow("student", "pocket-math", 50.0, "b"),
            ScoreRow("laten", "pocket-math", 52.0, "c"), ScoreRow("laten", "pocket-code", 10.0, "c")]
    g = gains.gains_over_student(rows).set_index(["source", "family", "method"]).gain
    assert g[(gains.PROJECT, "math", "laten")] == pytest.approx(7.0)  # against the mean student score
    assert (gains.PROJECT, "code", "laten") not in g  # no student score on that task
    assert g[(gains.PAPER_SOURCE, "math", "laten")] == pytest.approx(20.47 - 16.07)
    assert g[(gains.PAPER_SOURCE, "code", "laten")] == pytest.approx(((14.63 - 14.05) + (18.20 - 17.80)) / 2)
    assert len(gains.gains_over_student([])) > 0  # the paper's rows alone
