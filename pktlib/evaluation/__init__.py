"""Evaluation: zero-shot greedy scoring of a model on a task, under one of two protocols.

DESIGN.md 4.7. :func:`evaluate` builds each test prompt, runs a backend
(:class:`HFGenerator`, Hugging Face ``generate``; :class:`VLLMGenerator`, a vLLM engine) and
scores the outputs. *How* is the ``protocol`` (:data:`PROTOCOLS`, dispatched in one place):

``"pkt"`` (the project's own; every pocket-pair number in the book). The prompt is the task's
chat messages in the default template (:func:`pktlib.data.format_prompt`); one greedy
completion, cut at the first stop string, is read by the scorer of the task's family
(:func:`pktlib.data.task_info`):

* ``knowledge`` (MMLU, pocket-knowledge): accuracy of the letter after "The answer is:"
  (else of the choice whose text follows it, for tasks with ``meta["choices"]``, else the
  first standalone A-D) against ``meta["answer"]`` (:func:`pktlib.data.extract_choice`);
* ``math`` (GSM8K, pocket-math): accuracy of the number in the last ``\\boxed{}`` or after the
  last "answer is" or "####", compared as numbers (:func:`pktlib.data.extract_number`,
  :func:`pktlib.data.numbers_equal`: integers exactly, decimals to a relative 1e-6);
* ``code`` (HumanEval, MBPP, pocket-code): pass@1 of the greedy program (the first Python
  fenced block, :func:`extract_code`), executed with its tests in the sandbox of
  :mod:`pktlib.evaluation.sandbox` (:func:`build_program`);
* ``custom`` (a local ``.jsonl`` task): exact match of the whitespace-normalised completion
  with ``meta["answer"]``, else the reference answer.

``"open-instruct"`` (the paper's evaluator: allenai/open-instruct ``eval/gsm``, ``eval/mmlu``,
``eval/codex_humaneval``, ``eval/mbpp`` ``run_eval.py`` with ``--use_chat_format``; read at
the last commit before those scripts were removed, 2025-07). The chat format is the model's
own chat template when its tokenizer has one (open-instruct's
``create_prompt_with_huggingface_tokenizer_template``), else open-instruct's default Tulu
format (``<|user|>\\n...\\n<|assistant|>\\n``); the prompt is tokenised with the tokenizer's
special tokens, as there. Per benchmark:

* GSM8K: "Answer the following question.\\n\\nQuestion: {question}", prefilled "Answer:";
  up to 512 new tokens, no stop string (chat models stop themselves); the prediction is the
  last number of the output (``[-+]?\\d*\\.\\d+|\\d+`` after joining ``1,234``; the whole
  output when there is none), scored by exact match ignoring case and punctuation (as
  ``evaluate.load("exact_match")`` there: so ``-5`` matches ``5`` and ``18.0`` does not match
  ``18``).
* MMLU: "The following are multiple choice questions (with answers) about {subject}.\\n\\n"
  (the subject's words each preceded by a space, hence two spaces after "about"), the question,
  "A. .." to "D. ..", "Answer:", prefilled "The answer is:"; no generation: the prediction is
  the letter whose token (the last token of " A" ... " D") is most probable next. Accuracy over
  all questions (micro), with the per-subject macro average alongside.
* HumanEval: "Complete the following python function.\\n\\n\\n{prompt}", prefilled "Here is the
  function:\\n\\n```python\\n{prompt}" (the model continues the body and closes the block); stops
  "\\nclass", "\\ndef", "\\n#", "\\nif", "\\nprint" (the Codex paper's) and "\\n```"; the program is
  prompt + completion + test + ``check(entry_point)``.
* MBPP: "Complete the following python function.\\n\\n\\n" + the problem text + the reference
  solution up to its first ":" (the function header; nothing separates it from the text, as
  there), prefilled "Here is the completed function:\\n\\n\\n```python\\n" (as open-instruct's
  MBPP+ script); stop: a fence; the program is completion + tests.

Forced or chosen differences from open-instruct (also stated in the Evaluation chapter):

* Zero-shot everywhere: open-instruct's defaults are 8 chain-of-thought exemplars for GSM8K
  and 5 dev questions for MMLU; DESIGN.md's setting is zero-shot (``--n_shot 0``,
  ``--ntrain 0`` there).
* Code is decoded greedily, one completion per problem; open-instruct samples 20 at
  temperature 0.1 (top-p 0.95 for HumanEval) and estimates pass@1 from them. Greedy is that
  estimate's low-temperature limit and costs 20x less.
* HumanEval: open-instruct has two chat forms. With the HumanEvalPack file
  (``humanevalpack.jsonl``, not available offline) the user turn is HumanEvalPack's instruction
  and the answer is prefilled "Here is the function:\\n\\n```python\\n" + the problem's prompt, with
  "\\n```" added to the stops; without it, the user turn is the instruction above + the prompt
  and the answer only "Here is the completed function:\\n\\n\\n". Here: the fallback's user turn
  (HumanEvalPack's instructions are missing) with the HumanEvalPack answer and stops. Both of
  the fallback's answers fail on chat models for reasons that are not the model's code: left
  bare, Qwen2.5-Coder restates imports and header and the "\\ndef" stop cuts it before any body;
  with the problem's prompt after it but no code block, it writes the body and then prose ("You
  can test the function with ...") that no Codex stop catches, a syntax error: 12 of the 15
  failures of Qwen2.5-Coder-1.5B-Instruct on 20 problems were that (the Real pair chapter).
* MBPP: open-instruct scores MBPP+ (``evalplus/mbppplus``) rows 100-377 with MBPP+'s extended
  tests; offline there is only its source, sanitized MBPP. The protocol's default MBPP split is
  ``sanitized-test`` (sanitized MBPP after the same 100-problem hold-out: 327 problems) with
  the original three asserts per problem, which is more lenient than MBPP+.
* Programs run in the sandbox of :mod:`pktlib.evaluation.sandbox` (10 s per program) instead of
  open-instruct's in-process ``exec`` with a 3 s timeout (HumanEval) / 10 s (MBPP).
* Batches are left-padded with position ids counted from each prompt's first real token, so a
  prompt scores as it would alone (open-instruct's default batch size is 1).

Both backends get the same token ids (the prompt tokenised once here, left-truncated to fit
the context) and their generated token ids are decoded and cut here the same way, so the two
differ only in the forward pass. Scores are percentages with a Wilson 95% interval.
"""
from __future__ import annotations

import time
from typing import Sequence

import torch

from pktlib.analysis.stats import PairedTest, paired_test, wilson_interval
from pktlib.data import Example, LETTERS, extract_choice, extract_number, load_task, numbers_equal, task_info
from pktlib.errors import PktError
from pktlib.evaluation.scoring import (DEFAULT_MAX_NEW_TOKENS, extract_code, build_program, truncate_at_stop,
                                       stop_strings, ExampleRecord, EvalResult, example_rows,
                                       score_choice, score_number, score_exact, SCORERS, group_scores)
from pktlib.evaluation.protocols import (score_completions, oi_chat_prompt, oi_last_number, oi_exact_match, EvalProtocol, PROTOCOLS,
                                         get_protocol)
from pktlib.evaluation.backends import (Generator, HFGenerator, engine_key, VLLMGenerator, free_engines, model_name,
                                        make_generator, BACKENDS)


__all__ = [
    "EvalResult",
    "ExampleRecord",
    "Generator",
    "HFGenerator",
    "VLLMGenerator",
    "BACKENDS",
    "PROTOCOLS",
    "EvalProtocol",
    "get_protocol",
    "DEFAULT_MAX_NEW_TOKENS",
    "evaluate",
    "make_generator",
    "free_engines",
    "engine_key",
    "wilson_interval",
    "PairedTest",
    "paired_test",
    "extract_number",
    "numbers_equal",
    "extract_choice",
    "extract_code",
    "build_program",
    "truncate_at_stop",
    "score_completions",
    "group_scores",
    "SCORERS",
    "score_choice",
    "score_number",
    "score_exact",
    "stop_strings",
    "oi_chat_prompt",
    "oi_last_number",
    "oi_exact_match",
    "example_rows",
]


def evaluate(model, task: str, split: str | None = None, *, protocol: str = "pkt", backend: str = "hf",
             limit: int | None = None, batch_size: int = 16, seed: int = 0, max_new_tokens: int | None = None,
             progress: bool = True, generator: Generator | None = None, workers: int = 2, timeout: float = 10.0,
             indices: Sequence[int] | None = None, examples: Sequence[Example] | None = None,
             **backend_kwargs) -> EvalResult:
    """Zero-shot greedy score of ``model`` on ``task``/``split`` under ``protocol`` (DESIGN.md 4.7).

    ``model``: a model directory or hub id, or an in-memory ``(model, tokenizer)`` (hf only).
    ``task``: any :func:`pktlib.data.load_task` name. ``protocol``: ``"pkt"`` (the project's)
    or ``"open-instruct"`` (the paper's; gsm8k, mmlu, humaneval, mbpp only); see the module
    docstring. ``split`` defaults to the protocol's test split (``"test"``; open-instruct's MBPP:
    ``"sanitized-test"``). ``max_new_tokens`` defaults per protocol and family.
    ``generator`` reuses an already built backend. Code tasks run ``workers`` sandboxes at a
    time with a ``timeout`` (seconds) per program. ``indices`` scores only those positions of the
    split, in that order (a subset; ``limit`` then caps how many of them); an index outside the
    split raises :class:`PktError`. ``examples`` scores these instead of a stored split (questions
    of ``task``'s kind made elsewhere, e.g. :func:`pktlib.data.suite.fresh_examples`; ``split``
    then only labels the result, default ``"given"``); it cannot be combined with ``indices``.
    """
    t0 = time.perf_counter()
    proto = get_protocol(protocol)
    info = task_info(task)
    proto.check(info)
    for name, value, lo in (("limit", limit, 1), ("batch_size", batch_size, 1), ("max_new_tokens", max_new_tokens, 1),
                            ("workers", workers, 1)):
        if value is not None and value < lo:
            raise PktError(f"{name} must be >= {lo}, got {value}")
    if timeout <= 0:
        raise PktError(f"timeout must be > 0 seconds, got {timeout}")
    if examples is not None and indices is not None:
        raise PktError("evaluate takes either `examples` or `indices`, not both")
    split = split or ("given" if examples is not None else proto.test_split(info))
    if examples is not None:
        examples = list(examples)[:limit]
    elif indices is None:
        examples = load_task(task, split, limit=limit)
    else:
        every = load_task(task, split)
        bad = [i for i in indices if not 0 <= i < len(every)]
        if bad:
            raise PktError(f"indices {bad[:5]} are outside task {task!r} split {split!r} ({len(every)} examples)")
        examples = [every[i] for i in indices][:limit]
    if not examples:
        raise PktError(f"task {task!r} split {split!r} has no examples (limit={limit})")
    torch.manual_seed(seed)
    gen = generator or make_generator(model, backend, batch_size=batch_size, seed=seed, **backend_kwargs)
    prompts = proto.prompts(examples, info, gen.tokenizer)
    t1 = time.perf_counter()
    if proto.next_token(info):
        max_new = 0
        logprobs = gen.next_token_logprobs(prompts, proto.candidates(gen.tokenizer), progress=progress)
        outputs = [LETTERS[max(range(len(lp)), key=lp.__getitem__)] for lp in logprobs]
    else:
        max_new = max_new_tokens or proto.max_new_tokens(info)
        outputs = gen.generate(prompts, max_new, proto.stops(info, gen.tokenizer), progress=progress)
    gen_s = time.perf_counter() - t1
    records = score_completions(examples, outputs, info.family, prompts=prompts, workers=workers,
                                timeout=timeout, progress=progress, protocol=proto.name)
    k, n = sum(r.correct for r in records), len(records)
    by_group = group_scores(records)
    return EvalResult(
        task=info.name, split=split, metric=info.metric, score=100 * k / n, n=n, n_correct=k,
        ci95=wilson_interval(k, n), backend=gen.name, model=model_name(model), max_new_tokens=max_new,
        wall_s=round(time.perf_counter() - t0, 3), generate_s=round(gen_s, 3),
        examples_per_s=round(n / gen_s, 3) if gen_s > 0 else 0.0,
        macro=sum(by_group.values()) / len(by_group) if len(by_group) > 1 else None, by_group=by_group,
        protocol=proto.name, records=records,
    )
