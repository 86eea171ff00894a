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


@pytest.mark.parametrize("text, expected", [
    ("The answer is $\\boxed{18}$.", "18"),  # the input
    ("So $x = \\boxed{1{,}000}$ dollars", "1000"),  # LaTeX thousands separator, boxed without a cue
    ("The answer is \\boxed{\\frac{1}{4}}", "0.25"),  # a fraction of two numbers
    ("The answer is $\\dfrac{3}{2}$", "1.5"),
    ("first \\boxed{3}, finally \\boxed{5}", "5"),  # the last box
    ("The answer is \u22125 degrees", "-5"),  # Unicode minus
    ("The answer is $1\\,234.", "1234"),  # LaTeX thin space
    ("The answer is \\$42", "42"),
    ("The answer is **+7**", "7"),
    ("\\boxed{x}", None),
])
def test_extract_number_latex_and_boxed(text, expected):
    assert extract_number(text) == expected


def test_numbers_equal():
    assert numbers_equal("18.00", "18") and numbers_equal("$1,000", "1000") and numbers_equal("-3", "-3.0")
    assert not numbers_equal("17", "18") and not numbers_equal(None, "18") and not numbers_equal("abc", "1")
    # integers compare exactly, whatever their size (GSM8K test has golds of 1,450,000)
    assert not numbers_equal("1450001", "1450000") and numbers_equal("1,450,000", "1450000")
    assert not numbers_equal("1450000.5", "1450000") and not numbers_equal("18.0000001", "18")
    # decimal golds: relative tolerance DECIMAL_REL_TOL (1e-6)
    from pktlib.data import DECIMAL_REL_TOL

    assert DECIMAL_REL_TOL == 1e-6
    assert numbers_equal("0.30000000000000004", "0.3") and numbers_equal("2.50", "2.5")
    assert not numbers_equal("0.33", "0.333") and not numbers_equal("2.5001", "2.5")


def test_one_number_rule_for_gold_answers_and_completions():
    """The loaders read gold answers with the scorer's own rule (pktlib.data.extract_number)."""
    from pktlib.data.answers import gsm_meta

    for ex in load_task("gsm8k", "extract"):
        assert ex.meta["answer"] == extract_number(ex.answer) == gsm_meta(ex.answer)["answer"]
    assert gsm_meta("So the answer is $\\boxed{1{,}450{,}000}$.") == {"answer": "1450000"}


@pytest.mark.parametrize("text, expected", [
    ("The answer is: C", "C"), ("the answer is (b)", "B"), ("I think D. The answer is: A", "A"),
    ("B", "B"), ("Because of A, ...", "A"), ("Apples", None), ("", None),
])
def test_extract_choice(text, expected):
    assert extract_choice(text) == expected


CHOICES = ["beagle", "parrot", "goose", "owl"]


@pytest.mark.parametrize("text, expected", [
    ("The answer is a parrot.", "B"),  # the input: "a" is an article, not the letter
    ("The answer is A parrot.", "B"),
    ("the answer is an owl", "D"),
    ("The answer is the goose", "C"),
    ("The answer is A because beagles bark.", "A"),  # "A" starting no choice text is the letter
    ("The answer is: A", "A"),
    ("The answer is (b)", "B"),
    ("The answer is b.", "B"),
    ("The answer is **C**", "C"),
    ("The answer is: parrot", "B"),
    ("The answer is a dog.", None),
])
def test_extract_choice_letter_cue_and_articles(text, expected):
    assert extract_choice(text, CHOICES) == expected


def test_extract_choice_letters_that_are_also_choice_texts():
    assert extract_choice("The answer is: A", ["O", "A", "B", "AB"]) == "A"  # a bare letter is a letter
    assert extract_choice("The answer is a parrot.") is None  # no choices: nothing to read


def test_extract_choice_by_text():
    choices = ["pine", "pineapple", "fig", "date"]
    assert extract_choice("The answer is: pineapple.", choices) == "B"  # the longest match wins
    assert extract_choice("The answer is: pine", choices) == "A"
    assert extract_choice("fig", choices) == "C"
    assert extract_choice("The answer is: figs", choices) is None  # not a whole-word match
    assert extract_choice("The answer is: D", choices) == "D"  # a letter still wins
    assert extract_choice("The answer is: apple", choices) is None


@pytest.mark.parametrize("text", [
    "```python3\ndef f():\n    return 1\n```\nThis function returns 1, and prose follows.",  # the input
    "```Python\ndef f():\n    return 1\n```\nDone.",
    "``` py\ndef f():\n    return 1\n```",
    "~~~python\ndef f():\n    return 1\n~~~\nMore text.",
    "````python title=\"f.py\"\ndef f():\n    return 1\n````\n",
    "Install first:\n```bash\npip install nothing\n```\nThen:\n```python\ndef f():\n    return 1\n```\nok",
    "```\ndef f():\n    return 1\n```\nExplanation: returns 1.",
])
def test_extract_code_any_fence_language(text):
    assert extract_code(text) == "def f():\n    return 1\n"


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
@pytest.mark.full_benchmark  # all 500 MBPP test references: about two minutes; `make test-all`
def test_mbpp_reference_solutions_pass_all():
    examples = load_task("mbpp")
    assert [ex.meta["task_id"] for ex in examples] == list(range(11, 511))
    _mbpp_check(examples)


def test_build_program_needs_tests():
    with pytest.raises(PktError, match="neither"):
        build_program("pass", {"id": "x"})


# ---------------------------------------------------------------------------- the open-instruct protocol
def test_open_instruct_prompts_tulu_format(tokenizer):
    from pktlib.evaluation import get_protocol
    from pktlib.data import task_info

    oi = get_protocol("open-instruct")
    gsm = load_task("gsm8k", limit=1)
    q = gsm[0].meta["question"].strip()
    assert oi.prompts(gsm, task_info("gsm8k"), tokenizer) == [
        f"<|user|>\nAnswer the following question.\n\nQuestion: {q}\n<|assistant|>\nAnswer:"]
    mmlu = load_task("mmlu", limit=1)
    assert oi.prompts(mmlu, task_info("mmlu"), tokenizer) == [
        "<|user|>\nThe following are multiple choice questions (with answers) about  abstract algebra.\n\n"
        "Find the degree for the given field extension Q(sqrt(2), sqrt(3), sqrt(18)) over Q.\n"
        "A. 0\nB. 4\nC. 2\nD. 6\nAnswer:\n<|assistant|>\nThe answer is:"]
    he = load_task("humaneval", limit=1)
    assert oi.prompts(he, task_info("humaneval"), tokenizer) == [
        "<|user|>\nComplete the following python function.\n\n\n" + he[0].meta["code_prompt"]
        + "\n<|assistant|>\nHere is the function:\n\n```python\n" + he[0].meta["code_prompt"]]  # the body follows
    mb = load_task("mbpp", "sanitized-test", limit=1)
    assert mb[0].meta["reference"].startswith("def sum_range_list(list1, m, n):")
    assert oi.prompts(mb, task_info("mbpp"), tokenizer)[0].startswith(
        "<|user|>\nComplete the following python function.\n\n\n" + mb[0].meta["text"] + "def sum_range_list(list1, m, n)\n")
    assert oi.test_split(task_info("mbpp")) == "sanitized-test" and oi.test_split(task_info("gsm8k")) == "test"
    assert oi.stops(task_info("humaneval"), tokenizer) == ["\nclass", "\ndef", "\n#", "\nif", "\nprint", "\n```", "</s>"]
    assert oi.prompts(mb, task_info("mbpp"), tokenizer)[0].endswith("Here is the completed function:\n\n\n```python\n")
    assert oi.stops(task_info("mbpp"), tokenizer) == ["```", "</s>"] and oi.stops(task_info("gsm8k"), tokenizer) == ["</s>"]


def test_open_instruct_chat_template_and_prefill():
    from pktlib.evaluation import oi_chat_prompt

    tok = make_tokenizer()
    tok.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                         "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    assert oi_chat_prompt("Hi", tok, "Answer:") == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nAnswer:"
    tok.chat_template = "{% for m in messages %}[INST] {{ m['content'] }} [/INST]{% endfor %}"
    assert oi_chat_prompt("Hi", tok, "Answer:") == "[INST] Hi [/INST] Answer:"  # a space unless one ends it
    assert oi_chat_prompt("Hi", make_tokenizer()) == "<|user|>\nHi\n<|assistant|>\n"


@pytest.mark.parametrize("output, pred", [
    ("3 + 4 = 7 apples; 1,234 in all, or 5.5 dozen.", "5.5"), ("It costs $1,450,000.", "1450000"),
    ("no digits", "no digits"), ("-5", "5"), (".5", ".5"),
])
def test_open_instruct_last_number(output, pred):
    from pktlib.evaluation import oi_last_number

    assert oi_last_number(output) == pred


def test_open_instruct_exact_match_quirks():
    from pktlib.evaluation import oi_exact_match

    assert oi_exact_match("18", "18") and oi_exact_match("-5", "5")  # punctuation, signs included, is dropped
    assert not oi_exact_match("18.0", "18") and not oi_exact_match("0.5", ".5")  # "180" vs "18", "05" vs "5"


def test_open_instruct_programs_pass_with_references_and_fail_shifted():
    he = load_task("humaneval")[::12]  # 14 problems
    refs = [ex.meta["reference"] for ex in he]  # a completion that restates the whole function
    recs = score_completions(he, refs, "code", protocol="open-instruct", workers=4, timeout=30)
    assert [(r.id, r.status) for r in recs if not r.correct] == []
    assert recs[0].extracted.startswith(he[0].meta["code_prompt"] + refs[0])
    shifted = score_completions(he, refs[1:] + refs[:1], "code", protocol="open-instruct", workers=4, timeout=30)
    assert sum(r.correct for r in shifted) == 0
    mb = load_task("mbpp", "sanitized-test")[::11]  # 30 problems, some with imports
    refs = [ex.meta["reference"] for ex in mb]
    recs = score_completions(mb, refs, "code", protocol="open-instruct", workers=4, timeout=30)
    assert [(r.id, r.status) for r in recs if not r.correct] == []
    # the project's protocol scores the same problems (its prompt shows the text and the first test)
    assert all(r.correct for r in score_completions(mb, [ex.answer for ex in mb], "code", workers=4, timeout=30))


def test_open_instruct_refuses_other_tasks_and_unknown_protocols(tokenizer):
    model = make_model("llama", tokenizer=tokenizer)
    with pytest.raises(PktError, match="open-instruct protocol scores gsm8k, mmlu, humaneval, mbpp"):
        evaluate((model, tokenizer), "pocket-math", protocol="open-instruct", limit=1, progress=False)
    with pytest.raises(PktError, match="unknown evaluation protocol 'paper'; expected one of pkt, open-instruct"):
        evaluate((model, tokenizer), "gsm8k", protocol="paper", limit=1, progress=False)
    with pytest.raises(PktError, match="batch_size must be >= 1, got 0"):
        evaluate((model, tokenizer), "gsm8k", batch_size=0, limit=1, progress=False)


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
    assert all(r.prompt.endswith("<|assistant|>\n") and r.gold in ("A", "B", "C", "D") for r in res.records)
    # Re-scoring the recorded completions gives the same verdicts (scoring is a pure function).
    again = score_completions(load_task("pocket-knowledge", limit=8), [r.completion for r in res.records], "knowledge")
    assert [r.correct for r in again] == [r.correct for r in res.records]


def test_evaluate_given_examples_scores_them_like_a_split(tiny):
    split = evaluate(tiny, "pocket-math", "align", limit=6, max_new_tokens=8, progress=False, batch_size=6)
    given = evaluate(tiny, "pocket-math", examples=load_task("pocket-math", "align", limit=6), max_new_tokens=8,
                     progress=False, batch_size=6)
    assert given.split == "given" and given.n == 6
    assert [(r.id, r.completion, r.correct) for r in given.records] == [(r.id, r.completion, r.correct)
                                                                        for r in split.records]
    capped = evaluate(tiny, "pocket-math", "mine", examples=load_task("pocket-math", "align", limit=6), limit=2,
                      max_new_tokens=8, progress=False)
    assert capped.split == "mine" and [r.id for r in capped.records] == [r.id for r in split.records[:2]]
    with pytest.raises(PktError, match="either `examples` or `indices`"):
        evaluate(tiny, "pocket-math", examples=load_task("pocket-math", "align", limit=2), indices=[0], progress=False)


def test_open_instruct_mmlu_is_next_token_argmax(tiny):
    """No generation: the letter whose token is likeliest next, batched or not."""
    import torch

    from pktlib.evaluation import get_protocol

    model, tok = tiny
    res = evaluate(tiny, "mmlu", protocol="open-instruct", limit=6, batch_size=4, progress=False)
    assert res.max_new_tokens == 0 and res.protocol == "open-instruct" and res.split == "test"
    cands = get_protocol("open-instruct").candidates(tok)
    assert len(set(cands)) == 4 and [tok.decode([c]).strip() for c in cands] == ["A", "B", "C", "D"]
    for r in res.records:
        with torch.no_grad():
            logits = model(**tok(r.prompt, return_tensors="pt")).logits[0, -1]  # alone: no padding
        assert r.completion == r.extracted == "ABCD"[int(logits[cands].argmax())]
        assert r.correct == (r.completion == r.gold)
    lp = make_generator(tiny, "hf", batch_size=6).next_token_logprobs([r.prompt for r in res.records], cands)
    lp1 = make_generator(tiny, "hf", batch_size=1).next_token_logprobs([r.prompt for r in res.records], cands)
    assert torch.allclose(torch.tensor(lp), torch.tensor(lp1), atol=1e-4)  # left padding changes nothing


def test_open_instruct_gsm8k_generates_after_the_prefill(tiny):
    from pktlib.evaluation import oi_last_number

    res = evaluate(tiny, "gsm8k", protocol="open-instruct", limit=2, max_new_tokens=6, progress=False)
    assert res.max_new_tokens == 6 and all(r.prompt.endswith("<|assistant|>\nAnswer:") for r in res.records)
    assert all(r.extracted == oi_last_number(r.completion) for r in res.records)
    assert "open-instruct protocol" in res.summary()


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


# ---------------------------------------------------------------------------- vLLM
def test_engine_key_follows_the_weights_not_the_directory(tmp_path, tokenizer):
    from pktlib.evaluation import engine_key

    d = tmp_path / "m"
    make_model("llama", tokenizer=tokenizer, seed=0).save_pretrained(d)
    a = engine_key(d, dtype="float32", context=256, seed=0)
    assert engine_key(d, dtype="float32", context=256, seed=0) == a  # same weights: the cached engine
    make_model("llama", tokenizer=tokenizer, seed=1).save_pretrained(d)  # other weights, same directory
    b = engine_key(d, dtype="float32", context=256, seed=0)
    assert b[0] == a[0] and b != a
    empty = tmp_path / "no-safetensors"
    empty.mkdir()
    assert engine_key(empty, dtype="float32", context=256, seed=0) != engine_key(empty, dtype="float32",
                                                                                context=256, seed=0)


def test_engine_shape_decides_which_models_reload_into_an_engine(tmp_path, tokenizer):
    """Equal for other weights of one architecture; different for another architecture, a
    checkpoint missing a tensor, another tokenizer or other engine settings."""
    from safetensors.torch import load_file, save_file

    from pktlib.evaluation.backends import _engine_shape

    def saved(name, **kw):
        d = tmp_path / name
        make_model("llama", tokenizer=tokenizer, **kw).save_pretrained(d)
        tokenizer.save_pretrained(d)
        return d

    settings = {"dtype": "float32", "max_model_len": 256}
    a, b, wide = saved("a", seed=0), saved("b", seed=1), saved("wide", seed=0, intermediate_size=128)
    assert _engine_shape(a, settings) == _engine_shape(b, settings)
    assert _engine_shape(a, settings) != _engine_shape(wide, settings)
    assert _engine_shape(a, settings) != _engine_shape(a, {**settings, "dtype": "bfloat16"})
    (f,) = b.glob("*.safetensors")
    weights = load_file(f)
    weights.pop(sorted(weights)[-1])
    save_file(weights, f, metadata={"format": "pt"})
    assert _engine_shape(a, settings) != _engine_shape(b, settings)
    c = saved("c", seed=2)
    assert _engine_shape(a, settings) == _engine_shape(c, settings)
    config = json.loads((c / "tokenizer_config.json").read_text())
    (c / "tokenizer_config.json").write_text(json.dumps({**config, "model_max_length": 77}))
    assert _engine_shape(a, settings) != _engine_shape(c, settings)


@pytest.mark.slow
def test_vllm_reloads_weights_into_a_running_engine(tmp_path):
    """A model of a running engine's architecture is reloaded into it (no new processes); its
    answers equal a fresh engine's on the same prompts (the prefix cache of the old weights is
    dropped); a generator made earlier takes the engine back with its own weights, and refuses
    once its directory holds other weights."""
    pytest.importorskip("vllm")
    from pktlib.evaluation import free_engines
    from pktlib.evaluation.backends import _ENGINES

    tok = make_tokenizer()
    shape = dict(hidden_size=128, intermediate_size=256, n_layers=2, n_heads=2, num_key_value_heads=2,
                 max_position_embeddings=512)
    prompts = [format_prompt(ex.messages) for ex in load_task("pocket-math", limit=4)]
    dirs = {seed: tmp_path / f"seed{seed}" for seed in (0, 1)}
    for seed, d in dirs.items():
        make_model("llama", tokenizer=tok, seed=seed, **shape).save_pretrained(d)
        tok.save_pretrained(d)
    free_engines()
    try:
        g0 = make_generator(str(dirs[0]), "vllm")
        out0 = g0.generate(prompts, 12, [])
        g1 = make_generator(str(dirs[1]), "vllm")
        assert g1.llm is g0.llm and len(_ENGINES) == 1  # reloaded into the running engine
        out1 = g1.generate(prompts, 12, [])
        assert out1 != out0
        assert g0.generate(prompts, 12, []) == out0  # taken back, with seed 0's weights
        assert g1.generate(prompts, 12, []) == out1
        free_engines()
        assert make_generator(str(dirs[1]), "vllm").generate(prompts, 12, []) == out1  # a fresh engine agrees
        make_model("llama", tokenizer=tok, seed=2, **shape).save_pretrained(dirs[1])  # g1's folder, new weights
        make_generator(str(dirs[0]), "vllm")  # the engine leaves g1's weights
        with pytest.raises(PktError, match="changed since this vLLM generator was made"):
            g1.generate(prompts, 12, [])
    finally:
        free_engines()


@pytest.mark.slow
def test_vllm_engine_follows_new_weights_and_agrees_with_hf(tmp_path):
    """After other weights are saved into the same directory, vLLM serves the new model; its
    next-token log-probabilities match Hugging Face's, and scoring a task through either backend
    gives the same completions (one engine start per weights: each start costs most of a minute)."""
    pytest.importorskip("vllm")
    import torch

    from pktlib.evaluation import free_engines
    from pktlib.evaluation.backends import _ENGINES

    tok = make_tokenizer()
    d = tmp_path / "m"
    shape = dict(hidden_size=128, intermediate_size=256, n_layers=2, n_heads=2, num_key_value_heads=2,
                 max_position_embeddings=512)
    prompts = [format_prompt(ex.messages) for ex in load_task("pocket-math", limit=4)]
    cands = [tok.encode(" " + c, add_special_tokens=False)[-1] for c in "ABCD"]
    try:
        outs, lps = [], []
        for seed in (0, 1):
            model = make_model("llama", tokenizer=tok, seed=seed, **shape)
            model.save_pretrained(d)
            tok.save_pretrained(d)
            g = make_generator(str(d), "vllm")
            outs.append(g.generate(prompts, 12, []))
            lps.append(g.next_token_logprobs(prompts, cands))
            hf = make_generator((model, tok), "hf")
            assert torch.allclose(torch.tensor(lps[-1]), torch.tensor(hf.next_token_logprobs(prompts, cands)),
                                  atol=1e-3)
            assert sum(a == b for a, b in zip(outs[-1], hf.generate(prompts, 12, []))) >= 3
        assert len(_ENGINES) == 1  # the first engine was shut down when the weights changed
        assert outs[0] != outs[1] and lps[0] != lps[1]
        # the whole evaluate path, on the engine already serving these weights
        results = {b: evaluate(str(d) if b == "vllm" else (model, tok), "pocket-math", limit=64, backend=b,
                               max_new_tokens=24, progress=False) for b in ("hf", "vllm")}
        assert len(_ENGINES) == 1
    finally:
        free_engines()
    hf_rec, vl_rec = results["hf"].records, results["vllm"].records
    same = sum(a.completion == b.completion for a, b in zip(hf_rec, vl_rec))
    assert same >= 0.95 * 64, [(a.completion, b.completion) for a, b in zip(hf_rec, vl_rec)
                               if a.completion != b.completion][:3]
    assert abs(results["hf"].n_correct - results["vllm"].n_correct) <= 1


@pytest.mark.parametrize("cpus, preset, expected", [
    ({0, 1}, None, "0,1"),  # a 2-core machine: the model gets both cores
    ({3, 5, 7}, None, "3,5,7"),  # only the cores this process may use
    (set(range(16)), None, None),  # a large machine keeps vLLM's automatic binding
    ({0, 1}, "nobind", "nobind"),  # the user's setting wins
])
def test_vllm_cpu_engine_binds_every_core_of_a_small_machine(monkeypatch, cpus, preset, expected):
    from pktlib.evaluation import backends
    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)
    if preset is not None:
        monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", preset)
    monkeypatch.setattr(backends.os, "sched_getaffinity", lambda pid: cpus)
    backends._bind_all_cpus(1)
    assert backends.os.environ.get("VLLM_CPU_OMP_THREADS_BIND") == expected
    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)
    backends._bind_all_cpus(2)  # several ranks: vLLM's own per-rank binding
    assert "VLLM_CPU_OMP_THREADS_BIND" not in backends.os.environ


# What Qwen2.5-Coder-1.5B-Instruct wrote after HumanEval/31's prompt when the answer opened no code
# block: the body, then prose. Inside the block it closes the block instead, which the stops cut.
QWEN_IS_PRIME = ("    if n <= 1:\n        return False\n    for i in range(2, int(n**0.5) + 1):\n"
                 "        if n % i == 0:\n            return False\n    return True\n")


@pytest.mark.parametrize("tail, passes", [
    ("```\n\nThis function checks if a given number is prime by iterating up to its square root.", True),
    ("```\n\nYou can test the function with the provided examples:\n\n```python\nprint(is_prime(6))\n```", True),
    ("\n\nThis function checks if a given number is prime.", False),  # no block: prose reaches the program
])
def test_open_instruct_humaneval_block_end_stops_prose(tail, passes):
    from pktlib.data import task_info
    from pktlib.evaluation import get_protocol
    from pktlib.evaluation.sandbox import run_code

    oi = get_protocol("open-instruct")
    ex = next(e for e in load_task("humaneval") if e.meta["entry_point"] == "is_prime")
    completion = truncate_at_stop(QWEN_IS_PRIME + tail, oi.stops(task_info("humaneval"), None))
    result = run_code(oi.program(completion, ex.meta), timeout=10.0)
    assert result.passed is passes, (completion, result)
