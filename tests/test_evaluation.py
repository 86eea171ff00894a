"""Evaluation: scorers on the real benchmark answers, backends on tiny models, the CLI."""
from __future__ import annotations

import json

import pytest

from pktlib.data import Example, data_dir, format_prompt, load_task
from pktlib.errors import PktError
from pktlib.evaluation import (EvalResult, build_program, evaluate, extract_choice, extract_code, extract_number,
                               group_scores, make_generator, numbers_equal, score_completions,
                               stop_strings, truncate_at_stop)

from conftest import make_model, make_tokenizer


# ---------------------------------------------------------------------------- pure scorers
@pytest.mark.parametrize("text, expected", [
    ("So the answer is 18.", "18"),
    ("The answer is $1,234.50 in total", "1234.50"),
    ("blah\n#### 72", "72"),
    ("#### -3", "-3"),
    ("The answer is: x = 5", "5"),
    ("first the answer is 3, then rethinking, the answer is 4.", "4"),
    ("The answer is .5", ".5"),
    ("no marker 42", None),
])
def test_extract_number(text, expected):
    assert extract_number(text) == expected


def test_numbers_equal():
    assert numbers_equal("18.00", "18") and numbers_equal("$1,000", "1000") and numbers_equal("-3", "-3.0")
    assert not numbers_equal("17", "18") and not numbers_equal(None, "18") and not numbers_equal("abc", "1")


@pytest.mark.parametrize("text, expected", [
    ("The answer is: C", "C"), ("the answer is (b)", "B"), ("I think D. The answer is: A", "A"),
    ("B", "B"), ("Because of A, ...", "A"), ("Apples", None), ("", None),
])
def test_extract_choice(text, expected):
    assert extract_choice(text) == expected


def test_extract_choice_by_text():
    choices = ["pine", "pineapple", "fig", "date"]
    assert extract_choice("The answer is: pineapple.", choices) == "B"  # the longest match wins
    assert extract_choice("The answer is: pine", choices) == "A"
    assert extract_choice("fig", choices) == "C"
    assert extract_choice("The answer is: figs", choices) is None  # not a whole-word match
    assert extract_choice("The answer is: D", choices) == "D"  # a letter still wins
    assert extract_choice("The answer is: apple", choices) is None


def test_extract_code_and_stops():
    assert extract_code("Here:\n```python\ndef f():\n    return 1\n```\nmore") == "def f():\n    return 1\n"
    assert extract_code("```python\ndef f():\n    return 2") == "def f():\n    return 2\n"  # unclosed
    assert extract_code("def g():\n    return 3\n") == "def g():\n    return 3\n"
    assert truncate_at_stop("A\n\n<|user|>\nB", ["<|user|>", "\n\n<|"]) == "A"
    assert truncate_at_stop("no stop", ["</s>"]) == "no stop"


# ---------------------------------------------------------------------------- real benchmarks
def test_gsm8k_original_answers_parse_to_gold():
    rows = [json.loads(line) for line in open(data_dir() / "gsm8k" / "test.jsonl", encoding="utf-8")]
    examples = load_task("gsm8k")
    assert len(rows) == len(examples) == 1319
    wrong = [ex.id for row, ex in zip(rows, examples)
             if not numbers_equal(extract_number(row["answer"]), ex.meta["answer"])]
    assert wrong == []
    recs = score_completions(examples, [ex.answer for ex in examples], "math")
    assert sum(r.correct for r in recs) == 1319
    # Off-by-one answers fail.
    off = [row["answer"].rsplit("####", 1)[0] + f"#### {float(ex.meta['answer']) + 1:g}"
           for row, ex in zip(rows, examples)]
    assert sum(r.correct for r in score_completions(examples, off, "math")) == 0


def test_mmlu_gold_letters_score_and_wrong_letters_fail():
    examples = load_task("mmlu")[:400]
    assert sum(r.correct for r in score_completions(examples, [ex.answer for ex in examples], "knowledge")) == 400
    shifted = [f"The answer is: {'ABCD'[('ABCD'.index(ex.meta['answer']) + 1) % 4]}" for ex in examples]
    assert sum(r.correct for r in score_completions(examples, shifted, "knowledge")) == 0


def test_mmlu_macro_average_over_subjects():
    examples = load_task("mmlu")
    subjects = sorted({ex.meta["subject"] for ex in examples})
    assert len(examples) == 14042 and len(subjects) == 57
    # Right on the first subject only: micro = its share of questions, macro = 1/57.
    comps = [ex.answer if ex.meta["subject"] == subjects[0] else "" for ex in examples]
    recs = score_completions(examples, comps, "knowledge")
    by = group_scores(recs)
    assert by[subjects[0]] == 100 and sum(by.values()) / len(by) == pytest.approx(100 / 57)
    n0 = sum(ex.meta["subject"] == subjects[0] for ex in examples)
    assert sum(r.correct for r in recs) == n0


def test_custom_task_exact_match():
    exs = [Example([{"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Paris"}]),
           Example([{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "x"}], {"answer": "Four"})]
    assert [r.correct for r in score_completions(exs, [" paris.", "four"], "custom")] == [True, True]
    assert [r.correct for r in score_completions(exs, ["Lyon", "x"], "custom")] == [False, False]


@pytest.mark.slow  # runs every HumanEval reference (205 sandboxed programs)
def test_humaneval_canonical_solutions_pass_and_wrong_ones_fail():
    examples = load_task("humaneval")
    assert len(examples) == 164
    recs = score_completions(examples, [ex.answer for ex in examples], "code", workers=4, timeout=30)
    failed = [(r.id, r.status) for r in recs if not r.correct]
    assert failed == [], failed
    # A problem given the next problem's solution (a wrong function) must fail (every 4th, for time).
    some = examples[::4]
    wrong = [examples[(i + 1) % 164].meta["reference"] for i in range(0, 164, 4)]
    recs = score_completions(some, wrong, "code", workers=4, timeout=30)
    assert sum(r.correct for r in recs) == 0, [r.id for r in recs if r.correct]


def test_humaneval_body_continuation():
    ex = load_task("humaneval", limit=1)[0]  # HumanEval/0 has_close_elements
    body = ex.meta["reference"][len(ex.meta["code_prompt"]):]
    assert body[:1].isspace()
    assert score_completions([ex], [body], "code")[0].correct
    assert not score_completions([ex], ["    return False\n"], "code")[0].correct


def _mbpp_check(examples):
    recs = score_completions(examples, [ex.answer for ex in examples], "code", workers=4, timeout=30)
    assert [(r.id, r.status) for r in recs if not r.correct] == []
    wrong = [f"```python\n{examples[(i + 1) % len(examples)].meta['reference']}\n```" for i in range(len(examples))]
    recs = score_completions(examples, wrong, "code", workers=4, timeout=30)
    assert sum(r.correct for r in recs) == 0


@pytest.mark.slow  # runs 50 MBPP references and 50 wrong solutions in the sandbox
def test_mbpp_reference_solutions_pass_subset():
    examples = [ex for ex in load_task("mbpp") if ex.meta["task_id"] % 10 == 7]  # 50, incl. task 367
    assert any(ex.meta["setup"] for ex in examples)
    _mbpp_check(examples)


@pytest.mark.slow
def test_mbpp_reference_solutions_pass_all():
    examples = load_task("mbpp")
    assert [ex.meta["task_id"] for ex in examples] == list(range(11, 511))
    _mbpp_check(examples)


def test_build_program_needs_tests():
    with pytest.raises(PktError, match="neither"):
        build_program("pass", {"id": "x"})


# ---------------------------------------------------------------------------- backends
@pytest.fixture(scope="module")
def tiny(tokenizer):
    return make_model("llama", tokenizer=tokenizer, max_position_embeddings=512), tokenizer


def test_hf_left_padding_matches_unbatched(tiny):
    model, tok = tiny
    prompts = [format_prompt(ex.messages) for ex in load_task("pocket-math", limit=4)]
    prompts[1] = prompts[1][:40] + "\n\n<|assistant|>\n"  # lengths differ: padding is exercised
    g = make_generator(tiny, "hf", batch_size=4)
    batched = g.generate(prompts, 8, stop_strings(tok))
    g.batch_size = 1
    single = g.generate(prompts, 8, stop_strings(tok))
    assert batched == single
    assert all(not any(s in c for s in stop_strings(tok)) for c in batched)


def test_evaluate_in_memory_knowledge(tiny):
    res = evaluate(tiny, "pocket-knowledge", limit=8, progress=False, batch_size=8)
    assert isinstance(res, EvalResult) and res.n == 8 and res.backend == "hf"
    assert res.metric == "accuracy" and res.max_new_tokens == 16
    assert res.score == 100 * sum(r.correct for r in res.records) / 8
    assert res.ci95[0] <= res.score <= res.ci95[1]
    assert all(r.prompt.endswith("<|assistant|>\n") and r.gold in "ABCD" for r in res.records)
    # Re-scoring the recorded completions gives the same verdicts (scoring is a pure function).
    again = score_completions(load_task("pocket-knowledge", limit=8), [r.completion for r in res.records], "knowledge")
    assert [r.correct for r in again] == [r.correct for r in res.records]


def test_evaluate_code_from_directory(tiny_dir):
    res = evaluate(str(tiny_dir), "pocket-code", limit=3, max_new_tokens=8, progress=False)
    assert res.metric == "pass@1" and res.n == 3 and res.score == 0.0  # a random model writes no program
    assert all(r.status in ("error", "failed") and "assert" in r.gold for r in res.records)


def test_bad_inputs(tiny):
    with pytest.raises(PktError, match="backend"):
        evaluate(tiny, "pocket-math", backend="nope", limit=1, progress=False)
    with pytest.raises(PktError, match="vllm backend needs a model directory"):
        evaluate(tiny, "pocket-math", backend="vllm", limit=1, progress=False)
    with pytest.raises(PktError, match="unknown task"):
        evaluate(tiny, "no-such-task", limit=1, progress=False)


def test_cli_eval_writes_results(tiny_dir, tmp_path, pkt):
    out = tmp_path / "res.json"
    code, stdout, err = pkt("eval", tiny_dir, "--task", "pocket-knowledge", "--limit", "3", "--out", out)
    assert code == 0, err[-2000:]
    assert "pocket-knowledge/test accuracy" in stdout and "n=3" in stdout
    data = json.loads(out.read_text())
    assert data["n"] == 3 and len(data["records"]) == 3 and data["backend"] == "hf"
    code, _, err = pkt("eval", tiny_dir, "--task", "nope")
    assert code == 1 and err.startswith("error: unknown task")


# ---------------------------------------------------------------------------- vLLM agreement
def _agreement_model(tmp_path_factory) -> str:
    """The pocket student when the tiny pair is built, else a tiny random Llama (head_dim 64)."""
    try:
        from pktlib import zoo

        student = zoo.pair_dir("tiny") / "student-chat"
        if (student / "config.json").is_file():
            return str(student)
    except Exception:  # the zoo is optional here; the random model below is always available
        pass
    d = tmp_path_factory.mktemp("tiny-llama-128")
    tok = make_tokenizer()
    make_model("llama", tokenizer=tok, hidden_size=128, intermediate_size=256, n_layers=4, n_heads=2,
               num_key_value_heads=2, max_position_embeddings=512).save_pretrained(d)
    tok.save_pretrained(d)
    return str(d)


@pytest.mark.slow
def test_hf_and_vllm_agree(tmp_path_factory):
    pytest.importorskip("vllm")
    from pktlib.evaluation import free_engines

    model_dir = _agreement_model(tmp_path_factory)
    try:
        results = {b: evaluate(model_dir, "pocket-math", limit=64, backend=b, max_new_tokens=24, progress=False)
                   for b in ("hf", "vllm")}
    finally:
        free_engines()
    hf, vl = results["hf"].records, results["vllm"].records
    same = sum(a.completion == b.completion for a, b in zip(hf, vl))
    assert same >= 0.95 * 64, [(a.completion, b.completion) for a, b in zip(hf, vl) if a.completion != b.completion][:3]
    assert abs(results["hf"].n_correct - results["vllm"].n_correct) <= 1
