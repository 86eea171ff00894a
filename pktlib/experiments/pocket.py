"""The pocket pair's chapter: its shape against Llama-2, its training, and what each model knows.

The per-example breakdowns (:func:`correct_by`, :func:`accuracy_by`) score both chat models on a
family's test split and group their per-question correctness by a property of the question
recorded in the suite (a person's popularity, a code kind's frequency).
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import pandas as pd

from pktlib import zoo
from pktlib.data import load_task
from pktlib.evaluation import evaluate
from pktlib.experiments.overview import dimension_ratios
from pktlib.models import ModelSpec, reference_spec

__all__ = ["ARCH_ROWS", "CHECKPOINTS", "architecture_table", "llama2_ratios", "ratio_reading", "stage_table",
           "training_table", "loss_curves", "score_table", "gap_reading", "correct_by", "accuracy_by",
           "popularity_bins", "popularity_reading", "kind_share_bins", "kind_reading", "sample_generations"]

ARCH_ROWS = ["arch", "n_layers", "hidden_size", "intermediate_size", "n_heads", "head_dim", "vocab_size", "parameters"]
CHECKPOINTS = ["teacher-base", "student-base", "teacher-chat", "student-chat"]
ROLES = ("teacher", "student")


def architecture_table(specs: Mapping[str, ModelSpec], cards: Mapping[str, dict]) -> pd.DataFrame:
    """Teacher and student side by side: their :class:`ModelSpec` fields and parameter counts."""
    arch = pd.DataFrame({role: {**s.to_dict(), "parameters": cards[f"{role}-chat"]["parameters"]}
                         for role, s in specs.items()})
    return arch.loc[ARCH_ROWS]


def llama2_ratios(specs: Mapping[str, ModelSpec], cards: Mapping[str, dict]) -> pd.DataFrame:
    """Teacher / student ratios of Llama-2 13B / 7B (public configs) and of the pocket pair.

    Rows: depth, hidden size, FFN size, FFN / hidden (of the larger model), parameters.
    """
    l13, l7 = reference_spec("Llama-2-13b-chat"), reference_spec("Llama-2-7b-chat")
    t, s = specs["teacher"], specs["student"]
    ratios = pd.DataFrame({"Llama-2 13B / 7B": dimension_ratios(l13, l7),
                           "pocket teacher / student": dimension_ratios(t, s)})
    ratios.loc["FFN / hidden"] = [l13.intermediate_size / l13.hidden_size, t.intermediate_size / t.hidden_size]
    ratios.loc["parameters"] = [l13.n_parameters / l7.n_parameters,
                                cards["teacher-chat"]["parameters"] / cards["student-chat"]["parameters"]]
    return ratios


def ratio_reading(ratios: pd.DataFrame) -> str:
    """The ratios as a paragraph (why the pocket pair's step is wider than Llama-2's)."""
    r, l = ratios["pocket teacher / student"], ratios["Llama-2 13B / 7B"]
    return (f"The pocket teacher has {r['n_layers']:.2g}x the student's layers, {r['hidden_size']:.2g}x its hidden "
            f"size and {r['intermediate_size']:.2g}x its FFN size ({r['parameters']:.2g}x the parameters), against "
            f"{l['n_layers']:.2g}x in each dimension for Llama-2 13B/7B ({l['parameters']:.2g}x the parameters). "
            "At this scale a 1.25x step barely changes what a model learns in a CPU budget, so the pocket pair "
            "takes a wider step (a deviation from the paper's pair, chosen so that the teacher holds clearly more "
            f"knowledge to transfer). Its FFN/hidden ratio is {r['FFN / hidden']:.2f} "
            f"(Llama-2: {l['FFN / hidden']:.2f}).")


def stage_table(cfg: zoo.PairConfig) -> pd.DataFrame:
    """The two training stages of a preset: epochs, batch, each model's learning rate, replay, matmul dtype."""
    return pd.DataFrame({stage: {"epochs": tc.epochs, "batch size": tc.batch_size,
                                 "teacher lr": tc.lr_for(cfg.teacher.hidden_size),
                                 "student lr": tc.lr_for(cfg.student.hidden_size), "replay share": tc.replay,
                                 "teacher matmuls": cfg.teacher.autocast or "float32",
                                 "student matmuls": cfg.student.autocast or "float32"}
                         for stage, tc in (("base", cfg.base), ("chat", cfg.chat))})


def training_table(cards: Mapping[str, dict]) -> pd.DataFrame:
    """Per chat checkpoint and stage: steps, tokens, seconds and final loss, from the cards."""
    return pd.DataFrame([{"checkpoint": name, "stage": stage, "steps": t["steps"], "tokens": t["tokens"],
                          "seconds": round(t["seconds"], 1), "final loss": t["loss_curve"][-1][1]}
                         for name, c in cards.items() if name.endswith("chat") for stage, t in c["training"].items()])


def loss_curves(cards: Mapping[str, dict]) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """``{stage: {role: [(step, loss), ...]}}`` of the chat checkpoints (base then chat training)."""
    stages = ("base", "chat")
    return {stage: {role: [(p[0], p[1]) for p in cards[f"{role}-chat"]["training"][stage]["loss_curve"]]
                    for role in ROLES} for stage in stages}


def score_table(scores: Mapping[str, Mapping[str, float]]) -> tuple[pd.DataFrame, pd.Series]:
    """(checkpoints x tasks scores, teacher-chat minus student-chat per task)."""
    table = pd.DataFrame(scores).T.loc[CHECKPOINTS]
    return table, table.loc["teacher-chat"] - table.loc["student-chat"]


def gap_reading(gap: pd.Series, table: pd.DataFrame, paper_gap: Mapping[str, float]) -> str:
    """The pocket pair's chat gap next to the paper's 13B - 7B gap, and whether it is wider everywhere."""
    return ("The teacher-chat minus student-chat gap per family is "
            + ", ".join(f"{k} {v:+.1f} points" for k, v in gap.items())
            + f"; the student scores {table.loc['student-chat', 'pocket-knowledge']:.1f}% on knowledge (chance 25%). "
            "In the paper the 13B-chat model leads 7B-chat by "
            + ", ".join(f"{v:.1f} ({k})" for k, v in paper_gap.items()) + " points. "
            + ("The pocket pair's gap is wider on every family, so a transfer that closes part of it is measurable."
               if gap.min() > max(paper_gap.values()) else
               "On at least one family the pocket pair's gap is no wider than the paper's: read transfer "
               "results on that family with care."))


def correct_by(pair: zoo.PocketPair, family: str, key: str, *, limit: int | None = None) -> pd.DataFrame:
    """Per-example correctness of both chat models on ``pocket-<family>``'s test split.

    Columns: model ("teacher-chat"/"student-chat"), ``key`` (the example's ``meta[key]``), correct.
    """
    value = {ex.meta["id"]: ex.meta[key] for ex in load_task(f"pocket-{family}", "test", limit=limit)}
    rows = []
    for role in ROLES:
        res = evaluate(getattr(pair, role), f"pocket-{family}", limit=limit,
                       max_new_tokens=zoo.MAX_NEW_TOKENS[family], progress=False)
        rows += [{"model": f"{role}-chat", key: value[r.id], "correct": r.correct} for r in res.records]
    return pd.DataFrame(rows)


def accuracy_by(df: pd.DataFrame, bins: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(table of count and accuracy in % per bin and model, accuracy in % per bin (rows) and model)."""
    table = df.groupby([bins, "model"], observed=True)["correct"].agg(["mean", "size"]).unstack("model")
    acc = 100 * table["mean"]
    out = table.drop(columns="mean")
    for m in acc:
        out[(f"{m} (%)", "")] = acc[m].round(1)  # a full key: the columns are (statistic, model)
    return out, acc


def popularity_bins(df: pd.DataFrame, bio_repeats: tuple[int, int], n_bins: int = 4) -> pd.DataFrame:
    """``df`` with a column "biographies": its "popularity" cut into ``n_bins`` geometric bins over
    ``bio_repeats`` (the suite's range of biographies per person)."""
    lo, hi = bio_repeats
    edges = np.unique(np.round(np.geomspace(lo, hi + 1, n_bins + 1)).astype(int))
    return df.assign(biographies=pd.cut(df["popularity"], edges, right=False))


def kind_share_bins(df: pd.DataFrame, n_bins: int = 3) -> pd.DataFrame:
    """``df`` with a column "kind share of problems": its "kind_frequency" cut into quantile bins."""
    return df.assign(**{"kind share of problems": pd.qcut(df["kind_frequency"], n_bins, duplicates="drop")})


def popularity_reading(acc: pd.DataFrame) -> str:
    rare, famous = acc.iloc[0], acc.iloc[-1]
    return (f"For the least described people ({acc.index[0]} biographies) the teacher answers "
            f"{rare['teacher-chat']:.0f}% and the student {rare['student-chat']:.0f}% correctly; for the most described "
            f"({acc.index[-1]}) {famous['teacher-chat']:.0f}% and {famous['student-chat']:.0f}%. Below 25% a model "
            "names a value that is not among the four choices.")


def kind_reading(acc: pd.DataFrame) -> str:
    rare, common = acc.iloc[0], acc.iloc[-1]
    return (f"On the rarest third of kinds the teacher passes {rare['teacher-chat']:.0f}% and the student "
            f"{rare['student-chat']:.0f}%; on the most common third {common['teacher-chat']:.0f}% and "
            f"{common['student-chat']:.0f}%. "
            + ("Here the student knows more of the tail: it memorises a rarely seen name-to-rule mapping in fewer "
               "examples than the teacher, so this family shows no capacity gap in this pair."
               if rare["student-chat"] > rare["teacher-chat"] else
               "The teacher knows more of the tail: the capacity gap this family was built to show."))


def sample_generations(pair: zoo.PocketPair, n: int) -> pd.DataFrame:
    """Both chat models' greedy answers to the first ``n`` test questions of every family, scored."""
    rows: list[dict[str, Any]] = []
    for fam in zoo.FAMILIES:
        for role in ROLES:
            res = evaluate(getattr(pair, role), f"pocket-{fam}", limit=n, max_new_tokens=zoo.MAX_NEW_TOKENS[fam],
                           progress=False)
            rows += [{"family": fam, "model": role, "id": rec.id, "completion": rec.completion.strip(),
                      "gold": rec.gold, "correct": rec.correct} for rec in res.records]
    return pd.DataFrame(rows).sort_values(["family", "id", "model"])
