"""The real-pair scores: seeded nested subsets, the per-question cache, resuming, the paired gap table."""
from __future__ import annotations

import json

import pandas as pd
import pytest

from conftest import make_model
from pktlib.errors import PktError
from pktlib.evaluation import HFGenerator, evaluate
from pktlib.experiments import real_pair as rp
from pktlib.models import load_model

SETTINGS = rp.ScoreSettings(backend="hf", max_new_tokens=4, batch_size=4)


@pytest.fixture(scope="module")
def pair_root(tmp_path_factory, tokenizer):
    """A folder laid out as the pocket pair, with two tiny random Qwen2 models (GQA) of different widths."""
    root = tmp_path_factory.mktemp("tiny-real-pair")
    for role, kw in (("teacher-chat", dict(hidden_size=96, n_heads=6, seed=1)), ("student-chat", dict(seed=2))):
        make_model("qwen2", tokenizer=tokenizer, **kw).save_pretrained(root / role)
        tokenizer.save_pretrained(root / role)
    return root


class Counting:
    """A generator factory that counts the backends it makes and the prompts they see."""

    def __init__(self, model_dir, fail_after: int | None = None):
        self.model_dir, self.fail_after, self.made, self.prompts = model_dir, fail_after, 0, 0

    def __call__(self):
        self.made += 1
        gen = HFGenerator(*load_model(self.model_dir), batch_size=4)
        outer = self

        class Wrapped:
            name, tokenizer = gen.name, gen.tokenizer

            def generate(self, prompts, *a, **k):
                if outer.fail_after is not None and outer.prompts >= outer.fail_after:
                    raise RuntimeError("interrupted")
                outer.prompts += len(prompts)
                return gen.generate(prompts, *a, **k)

            def next_token_logprobs(self, prompts, *a, **k):
                outer.prompts += len(prompts)
                return gen.next_token_logprobs(prompts, *a, **k)

        return Wrapped()


def test_subsets_are_seeded_nested_and_spread():
    small, big = rp.subset_indices("gsm8k", 10, seed=0), rp.subset_indices("gsm8k", 40, seed=0)
    assert small == sorted(small) and len(set(small)) == 10 and set(small) <= set(big)
    assert rp.subset_indices("gsm8k", 10, seed=0) == small
    assert rp.subset_indices("gsm8k", 10, seed=1) != small
    assert max(big) > 40  # a sample of the split, not its first questions
    assert rp.subset_indices("mbpp", None) == list(range(327))  # open-instruct's MBPP split: sanitized-test
    assert len(rp.subset_indices("humaneval", 500)) == 164
    mmlu = rp.subset_indices("mmlu", 60)
    assert max(mmlu) - min(mmlu) > 5000  # many subjects, not the first file's
    with pytest.raises(PktError, match="subset size for 'gsm8k' must be >= 1"):
        rp.subset_indices("gsm8k", 0)


def test_scores_are_cached_per_question_and_equal_a_direct_run(pair_root, tmp_path):
    model_dir = pair_root / "student-chat"
    idx = rp.subset_indices("gsm8k", 3)
    gen = Counting(model_dir)
    first = rp.score_model(model_dir, "gsm8k", idx, settings=SETTINGS, generator=gen, root=tmp_path, chunk=2)
    assert (gen.made, gen.prompts) == (1, 3)
    direct = evaluate(str(model_dir), "gsm8k", protocol="open-instruct", indices=idx, max_new_tokens=4,
                      progress=False)
    assert [r.completion for r in first.records] == [r.completion for r in direct.records]
    assert (first.n, first.score, first.ci95, first.protocol) == (3, direct.score, direct.ci95, "open-instruct")
    # a rerun makes no backend; a larger subset scores only its new questions
    again = rp.score_model(model_dir, "gsm8k", idx, settings=SETTINGS, generator=gen, root=tmp_path)
    assert gen.made == 1 and [r.completion for r in again.records] == [r.completion for r in first.records]
    more = rp.subset_indices("gsm8k", 5)
    bigger = rp.score_model(model_dir, "gsm8k", more, settings=SETTINGS, generator=gen, root=tmp_path)
    assert (gen.made, gen.prompts, bigger.n) == (2, 5, 5)
    # other settings are another cache file
    other = rp.ScoreSettings(backend="hf", max_new_tokens=6)
    assert rp.score_cache_path(model_dir, "gsm8k", other, root=tmp_path) != \
        rp.score_cache_path(model_dir, "gsm8k", SETTINGS, root=tmp_path)
    assert rp.score_cache_path(model_dir, "gsm8k", rp.ScoreSettings(backend="hf", max_new_tokens=4, batch_size=16),
                               root=tmp_path) == rp.score_cache_path(model_dir, "gsm8k", SETTINGS, root=tmp_path)
    # other weights are another cache folder
    assert rp.score_cache_path(pair_root / "teacher-chat", "gsm8k", SETTINGS, root=tmp_path).parent != \
        rp.score_cache_path(model_dir, "gsm8k", SETTINGS, root=tmp_path).parent


def test_an_interrupted_run_resumes_from_its_last_chunk(pair_root, tmp_path):
    model_dir = pair_root / "student-chat"
    idx = rp.subset_indices("gsm8k", 5)
    with pytest.raises(RuntimeError, match="interrupted"):
        rp.score_model(model_dir, "gsm8k", idx, settings=SETTINGS, generator=Counting(model_dir, fail_after=2),
                       root=tmp_path, chunk=2)
    cached = json.loads(rp.score_cache_path(model_dir, "gsm8k", SETTINGS, root=tmp_path).read_text())
    assert sorted(map(int, cached["questions"])) == idx[:2]
    gen = Counting(model_dir)
    res = rp.score_model(model_dir, "gsm8k", idx, settings=SETTINGS, generator=gen, root=tmp_path, chunk=2)
    assert gen.prompts == 3 and res.n == 5


def test_a_broken_cache_file_is_named(pair_root, tmp_path):
    model_dir = pair_root / "student-chat"
    path = rp.score_cache_path(model_dir, "gsm8k", SETTINGS, root=tmp_path)
    path.parent.mkdir(parents=True)
    path.write_text("[1, 2]")
    with pytest.raises(PktError, match=r"not a score cache .*delete it to rescore"):
        rp.score_model(model_dir, "gsm8k", [0], settings=SETTINGS, root=tmp_path)


def test_score_pair_and_the_paired_gap_table(pair_root, tmp_path):
    limits = {"gsm8k": 2, "mmlu": 4, "humaneval": 2, "mbpp": 2}
    scores = rp.score_pair(str(pair_root), limits, settings=SETTINGS, root=tmp_path, progress=False)
    assert set(scores) == {"teacher", "student"} and list(scores["teacher"]) == list(limits)
    assert scores["student"]["mmlu"].max_new_tokens == 0  # MMLU from next-token probabilities
    table = rp.gap_table(scores)
    assert list(table.index) == ["GSM8K", "MMLU", "HumanEval", "MBPP"]
    for task, row in zip(limits, table.itertuples()):
        t, s = scores["teacher"][task], scores["student"][task]
        assert row.n == limits[task] and row.gap == pytest.approx(t.score - s.score, abs=0.01)
        assert row.gap_lo <= row.gap <= row.gap_hi and row.teacher_lo <= row.teacher <= row.teacher_hi
        assert row.teacher_only - row.student_only == t.n_correct - s.n_correct
    # a model against itself: no gap, nothing discordant
    same = rp.gap_table({"teacher": scores["student"], "student": scores["student"]})
    assert (same["gap"] == 0).all() and (same["p_value"] == 1).all() and (same["gap_lo"] < 0).all()
    costs = rp.cost_table(scores)
    assert len(costs) == 8 and (costs["generate_s"] >= 0).all()
    # a second call is served from the cache
    again = rp.score_pair(str(pair_root), limits, settings=SETTINGS, root=tmp_path, progress=False)
    assert rp.gap_table(again).equals(table)
    with pytest.raises(PktError, match=r"cover gsm8k, mmlu, humaneval, mbpp; not \['pocket-math'\]"):
        rp.score_pair(str(pair_root), {"pocket-math": 2}, settings=SETTINGS, root=tmp_path, progress=False)
    with pytest.raises(PktError, match="teacher and the student were scored on different questions"):
        rp.gap_table({"teacher": {"gsm8k": scores["teacher"]["gsm8k"]},
                      "student": {"gsm8k": scores["teacher"]["mmlu"]}})


def test_paper_gaps_come_from_the_scorecard():
    gaps = rp.paper_gaps()
    assert gaps.loc["GSM8K", rp.QWEN_TABLE8] == pytest.approx(73.24 - 62.02)
    assert gaps.loc["MMLU"].isna()[rp.QWEN_TABLE8]
    assert gaps.loc["HumanEval", rp.TABLE1] == pytest.approx(18.75 - 14.05)


def test_gap_figure_panels_and_asymmetric_intervals():
    gaps = pd.DataFrame({"teacher": [60.0], "teacher_lo": [50.0], "teacher_hi": [68.0], "student": [40.0],
                         "student_lo": [31.0], "student_hi": [50.0], "gap": [20.0], "gap_lo": [5.0], "gap_hi": [33.0]},
                        index=["GSM8K"])
    values, errors = rp.gap_figure(gaps, rp.paper_gaps(["gsm8k"]))
    assert values["scores"]["GSM8K"] == {"teacher": 60.0, "student": 40.0}
    assert errors["scores"]["GSM8K"] == {"teacher": (10.0, 8.0), "student": (9.0, 10.0)}
    assert errors["teacher - student"]["GSM8K"] == {"this pair": (15.0, 13.0)}
    assert values["teacher - student"]["GSM8K"] == {"this pair": 20.0, f"paper: {rp.QWEN_TABLE8}": pytest.approx(11.22),
                                                    f"paper: {rp.TABLE1}": pytest.approx(4.48)}
    values, _ = rp.gap_figure(gaps.rename(index={"GSM8K": "MMLU"}), rp.paper_gaps(["mmlu"]))
    assert list(values["teacher - student"]["MMLU"]) == ["this pair", f"paper: {rp.TABLE1}"]  # Qwen: none reported


def test_bodiless_counts_completions_without_an_indented_line():
    from pktlib.evaluation import EvalResult, ExampleRecord

    recs = [ExampleRecord(id=str(i), prompt="", completion=c, extracted=None, gold=None, correct=False)
            for i, c in enumerate(["from typing import List\n\n", "    return a + b\n", "", "x = 1\n   \n"])]
    res = EvalResult(task="humaneval", split="test", metric="pass@1", score=0.0, n=4, n_correct=0, ci95=(0.0, 60.0),
                     backend="hf", model="m", max_new_tokens=8, records=recs)
    assert rp.bodiless(res) == 3


def test_the_vllm_backend_gets_a_step_timeout_for_a_busy_cpu(monkeypatch):
    made = {}
    monkeypatch.delenv("VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS", raising=False)
    monkeypatch.setattr(rp, "make_generator", lambda model, backend, **kw: made.update(backend=backend, **kw) or "gen")
    assert rp.ScoreSettings(kv_cache_gib=0.5, max_model_len=1024).generator("m") == "gen"
    assert made["backend"] == "vllm" and made["kv_cache_memory_bytes"] == 2**29 and made["max_model_len"] == 1024
    import os
    assert os.environ["VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS"] == str(rp.VLLM_STEP_TIMEOUT_S)
    monkeypatch.setenv("VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS", "60")  # a user's setting wins
    rp.ScoreSettings().generator("m")
    assert os.environ["VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS"] == "60"


def test_cached_answers_asked_otherwise_are_scored_again(pair_root, tmp_path):
    model_dir = pair_root / "student-chat"
    idx = rp.subset_indices("gsm8k", 3)
    gen = Counting(model_dir)
    rp.score_model(model_dir, "gsm8k", idx, settings=SETTINGS, generator=gen, root=tmp_path)
    path = rp.score_cache_path(model_dir, "gsm8k", SETTINGS, root=tmp_path)
    cache = json.loads(path.read_text())
    assert cache["stops"] and gen.prompts == 3
    # an answer generated from another prompt (the protocol changed since): only it is asked again
    cache["questions"][str(idx[1])]["record"]["prompt"] += " (an older prompt)"
    path.write_text(json.dumps(cache))
    rp.score_model(model_dir, "gsm8k", idx, settings=SETTINGS, generator=gen, root=tmp_path)
    assert gen.prompts == 4
    # other stop strings: every answer is asked again
    cache = json.loads(path.read_text())
    cache["stops"] = ["\n\n"]
    path.write_text(json.dumps(cache))
    again = rp.score_model(model_dir, "gsm8k", idx, settings=SETTINGS, generator=gen, root=tmp_path)
    assert gen.prompts == 7 and again.n == 3
    # unchanged: nothing is asked
    rp.score_model(model_dir, "gsm8k", idx, settings=SETTINGS, generator=gen, root=tmp_path)
    assert gen.prompts == 7


def _scorer(pair_root, tmp_path, models, tok, limits=None):
    return rp.SavedScorer.for_pair(str(pair_root), limits or {"gsm8k": 2}, models, tok, settings=SETTINGS,
                                   root=tmp_path / "scores", work=tmp_path / "work", progress=False)


def test_saved_scorer_scores_models_in_memory_through_the_cache(pair_root, tmp_path, monkeypatch):
    import torch

    student, tok = load_model(pair_root / "student-chat")
    scorer = _scorer(pair_root, tmp_path, {"student": student}, tok)
    idx = rp.subset_indices("gsm8k", 2)
    # the pair's own model: scored from its checkpoint, nothing saved
    own = scorer(student, "gsm8k")
    direct = rp.score_model(pair_root / "student-chat", "gsm8k", idx, settings=SETTINGS, root=tmp_path / "scores")
    assert [r.completion for r in own.records] == [r.completion for r in direct.records]
    assert not (tmp_path / "work" / "transferred").exists()
    # a changed copy: saved, scored as the in-memory model would be, then removed from disk
    changed = load_model(pair_root / "student-chat")[0]
    with torch.no_grad():
        changed.model.layers[0].mlp.down_proj.weight.add_(0.5)
    res = scorer(changed, "gsm8k")
    ref = evaluate((changed, tok), "gsm8k", protocol="open-instruct", indices=idx, max_new_tokens=4, progress=False)
    assert [r.completion for r in res.records] == [r.completion for r in ref.records]
    assert [r.completion for r in res.records] != [r.completion for r in own.records]
    assert not (tmp_path / "work" / "transferred").exists()
    folders = sorted(p.name for p in (tmp_path / "scores").iterdir())
    assert len(folders) == 2 and any(f.startswith("transferred-") for f in folders)
    # the same weights again: answered from the cache, no backend made
    monkeypatch.setattr(rp.ScoreSettings, "generator", lambda *a, **k: pytest.fail("scored again"))
    again = scorer(changed, "gsm8k")
    assert [r.completion for r in again.records] == [r.completion for r in res.records]
    with pytest.raises(PktError, match="no question subset for task 'mbpp'; known: gsm8k"):
        scorer(changed, "mbpp")


def test_unaligned_pre_align_on_a_fetched_pair_layout(pair_root, tmp_path):
    """The unaligned grid on the paper's task names, GQA models and the Qwen module set, scored from disk."""
    from pktlib.experiments import unaligned_grid as ug
    from pktlib.pairs import TRANSFER_SETS

    teacher, t_tok = load_model(pair_root / "teacher-chat")
    student, s_tok = load_model(pair_root / "student-chat")
    scorer = _scorer(pair_root, tmp_path, {"teacher": teacher, "student": student}, s_tok)
    cells = [{"layers": "top", "hidden": h, "neurons": n} for h in ("pca", "embedding") for n in ("importance", "random")]
    runs = ug.run_grid((teacher, t_tok), (student, s_tok), scorer=scorer, families=["gsm8k"], task_format="{}",
                       cells=cells, seeds=[0], extract_limit=2, modules=TRANSFER_SETS["qwen"], progress=False)
    res = runs.results
    assert list(res.hidden) == ["pca", "pca", "embedding", "embedding", "seeking"]
    assert res.rel_delta.gt(0).all() and runs.tasks == {"gsm8k": "gsm8k"}
    direct = rp.score_model(pair_root / "teacher-chat", "gsm8k", rp.subset_indices("gsm8k", 2), settings=SETTINGS,
                            root=tmp_path / "scores")
    assert runs.refs["gsm8k"]["teacher"][0] == direct.score
    rows = ug.scorecard_rows(runs, ug.summary_table(runs, ["gsm8k"]), ug.comparisons(runs), pair="tiny",
                             families=["gsm8k"], protocol="open-instruct")
    assert {(r["task"], r["protocol"]) for r in rows} == {("gsm8k", "open-instruct")}
    assert "**gsm8k**" in ug.verdict(runs, ug.comparisons(runs), ["gsm8k"]).lines[0]
    assert not (tmp_path / "work" / "transferred").exists()
    mats = ug.grid_matrices(runs, ["gsm8k"])["gsm8k"]  # the cells left out are no rows or columns
    assert list(mats.index) == ["top"] and mats.shape == (1, 5) and mats.notna().all().all()


def test_post_align_on_a_fetched_pair_layout(pair_root, tmp_path, monkeypatch):
    """Post-Align on a paper task in the pair's chat template, GQA models, the Qwen module set, scored from disk."""
    from pktlib.experiments import postalign_grid as pg
    from pktlib.pairs import TRANSFER_SETS

    teacher, t_tok = load_model(pair_root / "teacher-chat")
    student, s_tok = load_model(pair_root / "student-chat")
    scorer = _scorer(pair_root, tmp_path, {"teacher": teacher, "student": student}, s_tok)
    kw = dict(scorer=scorer, root=tmp_path / "runs", families=["gsm8k"], settings={"align": ("align", 4)},
              inits=["random", "pissa", "seeking"], seeds=[0], r=4, alpha=4, epochs=1, batch_size=4, micro_batch=2,
              extract_limit=2, task_format="{}", modules=TRANSFER_SETS["qwen"], template="auto", progress=False)
    runs = pg.run_grid((teacher, t_tok), (student, s_tok), **kw)
    res = runs.results
    assert list(res.init) == ["random", "pissa", "seeking"] and (res.n_examples == 4).all()
    assert res.scored_now.isna().all() and runs.tasks == {"gsm8k": "gsm8k"}
    settings = json.loads((tmp_path / "runs" / "gsm8k-align-seeking-s0-e1-b4-x2" / "settings.json").read_text())
    assert settings["task"] == "gsm8k" and settings["template"] == "auto"
    rows = pg.scorecard_rows(runs, pair="tiny", families=["gsm8k"], settings={"align": ("align", 4)},
                             inits=["random", "pissa", "seeking"], n=2, protocol="open-instruct", references=False)
    assert [r["method"] for r in rows] == ["postalign-random-small", "postalign-pissa-small", "postalign-seeking-small"]
    assert {(r["task"], r["protocol"]) for r in rows} == {("gsm8k", "open-instruct")}
    # a rerun trains nothing and scores nothing: the runs resume from their folders, the answers are cached
    monkeypatch.setattr(rp.ScoreSettings, "generator", lambda *a, **k: pytest.fail("scored again"))
    again = pg.run_grid((teacher, t_tok), (student, s_tok), **kw)
    pd.testing.assert_frame_equal(again.results, res)


def test_laten_on_a_fetched_pair_layout(pair_root, tmp_path, monkeypatch):
    """LaTen on a paper task in the pair's chat template, GQA models, the Qwen module set, scored from disk;
    every located example attributed up front, once per model."""
    from pktlib import attribution
    from pktlib.data import load_task, prompt_answer_pairs
    from pktlib.experiments import laten_sweep as ls
    from pktlib.laten import read_settings
    from pktlib.laten.attributions import _example_key
    from pktlib.models import weights_hash
    from pktlib.pairs import TRANSFER_SETS

    teacher, t_tok = load_model(pair_root / "teacher-chat")
    student, s_tok = load_model(pair_root / "student-chat")
    scorer = _scorer(pair_root, tmp_path, {"teacher": teacher, "student": student}, s_tok)
    calls = []
    real_attribute = attribution.attribute
    monkeypatch.setattr("pktlib.laten.attributions.attribute",
                        lambda m, tok, pairs, **k: calls.append(len(pairs)) or real_attribute(m, tok, pairs, **k))
    kw = dict(tasks=["gsm8k"], configs={"paper lr": 3e-5, "script lr": 3e-4}, seeds=[0, 1], transfer_rates=[0.1],
              main_rate=0.1, limit=None, run_root=tmp_path / "runs", align_batch=3, max_length=128, eval_kwargs={},
              final_step_only=True,
              sweep_kwargs=dict(scorer=scorer, template="auto", modules=TRANSFER_SETS["qwen"], micro_batch=2,
                                diagnostics=False, cache_dir=tmp_path / "attributions", progress=False))
    runs, rows = ls.run_sweeps((teacher, t_tok), (student, s_tok), **kw)
    assert calls == [6, 6]  # 4 extract + 2 apply examples, one call per model, shared by both configurations
    assert [(r["config"], r["model"], r["seed"], r["step"]) for r in rows] == [
        ("paper lr", "student", None, None), ("paper lr", "teacher", None, None),
        ("paper lr", "laten", 0, 4), ("paper lr", "laten", 1, 4),
        ("script lr", "laten", 0, 4), ("script lr", "laten", 1, 4)]
    assert all(r["n"] == 2 for r in rows)
    # the attributed texts are the chat-template prompts, and the run stores the template for apply()
    ex = load_task("gsm8k", "extract")[0]
    key = _example_key(prompt_answer_pairs([ex], tokenizer=t_tok, template="auto")[0], "rms")
    assert (tmp_path / "attributions" / f"{weights_hash(teacher)}-{key}.safetensors").is_file()
    run_dir = rows[2]["run_dir"]
    assert read_settings(f"{run_dir}/checkpoint_4")["template"] == "auto"
    assert json.loads(open(f"{run_dir}/laten_config.json").read())["config"]["modules"] == ["up_proj", "down_proj",
                                                                                            "o_proj"]
    # a rerun trains, attributes and scores nothing
    monkeypatch.setattr(rp.ScoreSettings, "generator", lambda *a, **k: pytest.fail("scored again"))
    monkeypatch.setattr("pktlib.laten.attributions.attribute", lambda *a, **k: pytest.fail("attributed again"))
    again, _ = ls.run_sweeps((teacher, t_tok), (student, s_tok), **kw)
    pd.testing.assert_frame_equal(again, runs)
    # diagnostics off: the log keeps the step's own losses, not the two extra forward passes' ones
    log = [json.loads(x) for x in open(f"{run_dir}/log.jsonl").read().splitlines()]
    assert len(log) == 4 and all("lm_loss" in r and "mse" in r and "lm_loss_after" not in r for r in log)
    assert ls.train_logs(runs, 0.1).lm_gain_vs_student.isna().all()
    # the lr x penalty x step sweep on the same pair reuses those attributions (attribute still fails here)
    # and the cached baseline scores; only its own translators are trained and scored
    monkeypatch.undo()
    monkeypatch.setattr("pktlib.laten.attributions.attribute", lambda *a, **k: pytest.fail("attributed again"))
    sweep_kwargs = {k: v for k, v in kw["sweep_kwargs"].items() if k != "progress"}
    lr_runs, lr_rows, cost = ls.run_lr_sweep(
        (teacher, t_tok), (student, s_tok), tasks=["gsm8k"], lrs=[3e-3], steps=[2, 4], penalties=[1000.0, 0.0],
        seeds=[0, 1], transfer_rate=0.1, limit=None, run_root=tmp_path / "runs" / "lr-sweep", align_batch=3,
        max_length=128, eval_kwargs={}, sweep_kwargs=sweep_kwargs)
    assert not (tmp_path / "runs" / "lr-sweep" / "attributions").exists()
    assert [(r["model"], r["penalty"], r["seed"], r["step"]) for r in lr_rows if r["model"] == "laten"] == [
        ("laten", p, s, step) for p in (1000.0, 0.0) for s in (0, 1) for step in (2, 4)]
    base = {r["model"]: r["correct"] for r in rows if r["model"] in ("student", "teacher")}
    assert {r["model"]: r["correct"] for r in lr_rows if r["model"] != "laten"} == base
    table = ls.lr_sweep_table(lr_runs, weight_rms=ls.weight_rms(student))
    assert len(table) == 8 and set(table.n) == {2} and (table.delta_rms > 0).all()
