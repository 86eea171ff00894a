"""The Evaluation chapter: the scorers checked, the two backends compared, the two protocols compared.

Three parts, each returning the rows the chapter logs (so records stay comparable across runs)
and tables built from them:

* the scorers on the test split's own reference answers, and on the same answers shifted by one
  example (:func:`shifted_answers`, :func:`scorer_sanity`);
* the pocket pair scored per backend, model and task (:func:`evaluate_grid`, :func:`score_rows`),
  the teacher-student gap (:func:`teacher_minus_student`) and how often the backends give the
  same completion and verdict (:func:`backend_agreement`, :func:`agreement_summary`);
* a real instruction-tuned model scored under both protocols of :data:`pktlib.evaluation.PROTOCOLS`
  on the same questions (:func:`protocol_grid`), with an exact McNemar test per benchmark
  (:func:`protocol_paired_tests`) and counts that explain the differences
  (:func:`protocol_diagnostics`, :func:`side_by_side`).

Scores are percentages (``EvalResult.score``), rounded as the chapter shows them.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import pandas as pd

from pktlib import evaluation
from pktlib.data import Example, load_task, task_info
from pktlib.errors import PktError
from pktlib.evaluation import EvalResult

__all__ = ["REAL_SPLITS", "shifted_answers", "scorer_sanity", "evaluate_grid", "score_rows", "bar_values",
           "teacher_minus_student", "gap_lines", "backend_agreement", "agreement_summary", "generation_cap",
           "protocol_grid", "protocol_rows", "protocol_paired_tests", "protocol_diagnostics", "diagnostics_reading",
           "side_by_side"]

# The benchmarks of the protocol comparison and the split each is scored on (MBPP: sanitized MBPP
# after the 100-problem hold-out, the offline stand-in for open-instruct's MBPP+).
REAL_SPLITS = {"mmlu": "test", "gsm8k": "test", "humaneval": "test", "mbpp": "sanitized-test"}

Results = Mapping[tuple[str, str, str], EvalResult]  # (role, backend, task) -> result


def _pct(k: int, n: int, digits: int) -> float:
    return round(100 * k / n, digits)


# ----------------------------------------------------------------------------------------------
# The scorers on reference answers


def shifted_answers(examples: Sequence[Example], family: str) -> dict[str, float]:
    """The scorer of ``family`` (project protocol) on ``examples``' own answers and on shifted ones.

    Returns ``{"reference_%": ..., "shifted_%": ...}`` (percent correct, 2 decimals): each
    example's reference answer (its assistant turn), then the answer of the *next* example
    (the last gets the first's). A correct scorer gives 100 and (close to) 0. Code answers run
    with their tests in the sandbox. PktError for no examples.
    """
    n = len(examples)
    if n == 0:
        raise PktError("shifted_answers needs at least one example")
    right = evaluation.score_completions(examples, [ex.answer for ex in examples], family)
    shifted = evaluation.score_completions(examples, [examples[(i + 1) % n].answer for i in range(n)], family)
    return {"reference_%": _pct(sum(r.correct for r in right), n, 2),
            "shifted_%": _pct(sum(r.correct for r in shifted), n, 2)}


def scorer_sanity(tasks: Sequence[str], *, limit: int | None) -> dict[str, dict[str, float]]:
    """:func:`shifted_answers` on the first ``limit`` test examples of each task, keyed by task."""
    return {task: shifted_answers(load_task(task, limit=limit), task_info(task).family) for task in tasks}


# ----------------------------------------------------------------------------------------------
# The pocket pair per backend


def evaluate_grid(models: Mapping[str, Any], backends: Sequence[str], tasks: Sequence[str], *,
                  limit: int | None, seed: int = 0) -> dict[tuple[str, str, str], EvalResult]:
    """Every model (role -> checkpoint folder) on every task with every backend, project protocol.

    Keyed ``(role, backend, task)``. One generator per (backend, model), freed before the next
    so that one vLLM engine holds the memory at a time.
    """
    results = {}
    for backend in backends:
        for role, path in models.items():
            gen = evaluation.make_generator(str(path), backend, seed=seed)
            for task in tasks:
                results[role, backend, task] = evaluation.evaluate(str(path), task, limit=limit, generator=gen,
                                                                   seed=seed, progress=False)
            evaluation.free_engines()
    return results


def score_rows(results: Results) -> list[dict[str, Any]]:
    """One row per result: model, backend, task, family, metric, score (2 decimals), ci_low and
    ci_high (Wilson 95%, 1 decimal), n, examples_per_s."""
    return [{"model": role, "backend": backend, "task": task, "family": task_info(task).family,
             "metric": r.metric, "score": round(r.score, 2), "ci_low": round(r.ci95[0], 1),
             "ci_high": round(r.ci95[1], 1), "n": r.n, "examples_per_s": r.examples_per_s}
            for (role, backend, task), r in results.items()]


def bar_values(scores: pd.DataFrame, tasks: Sequence[str], *, title: str) -> dict[str, dict]:
    """Keyword arguments of :func:`pktlib.plots.grouped_bars` for :func:`score_rows`' table.

    One panel ``title``; groups: ``tasks`` in order; bars ``model/backend``; errors the Wilson
    interval as (below, above) the score. KeyError when a task has no row for some bar.
    """
    labels = list(dict.fromkeys(zip(scores["model"], scores["backend"])))
    table = scores.set_index(["model", "backend", "task"])
    values: dict[str, dict[str, float]] = {t: {} for t in tasks}
    errors: dict[str, dict[str, tuple[float, float]]] = {t: {} for t in tasks}
    for m, b in labels:
        for t in tasks:
            r = table.loc[(m, b, t)]
            values[t][f"{m}/{b}"] = float(r["score"])
            errors[t][f"{m}/{b}"] = (float(r["score"] - r["ci_low"]), float(r["ci_high"] - r["score"]))
    return {"values": {title: values}, "errors": {title: errors}}


def teacher_minus_student(results: Results, tasks: Sequence[str], backend: str) -> dict[str, float]:
    """Per task, the teacher's score minus the student's with ``backend`` (points, 2 decimals)."""
    return {task: round(results["teacher", backend, task].score - results["student", backend, task].score, 2)
            for task in tasks}


def gap_lines(gaps: Mapping[str, float], backend: str) -> str:
    """:func:`teacher_minus_student` as one line per task."""
    return "\n".join(f"{task}: teacher - student = {gap:+.2f} points ({backend} backend)"
                     for task, gap in gaps.items())


def backend_agreement(results: Results, roles: Sequence[str], tasks: Sequence[str],
                      backends: Sequence[str]) -> list[dict[str, Any]]:
    """The first two backends compared per (role, task), on the same questions in the same order.

    Row: model, task, identical_completions_% (1 decimal), ``<b0>_correct``, ``<b1>_correct``
    (counts), same_verdict_% (1 decimal). Empty when fewer than two backends were run.
    PktError when the two results hold different numbers of questions.
    """
    if len(backends) < 2:
        return []
    b0, b1 = backends[:2]
    rows = []
    for role in roles:
        for task in tasks:
            r0, r1 = results[role, b0, task].records, results[role, b1, task].records
            if len(r0) != len(r1) or not r0:
                raise PktError(f"{role}/{task}: {b0} scored {len(r0)} questions and {b1} {len(r1)}")
            same = sum(a.completion == b.completion for a, b in zip(r0, r1))
            rows.append({"model": role, "task": task, "identical_completions_%": _pct(same, len(r0), 1),
                         f"{b0}_correct": sum(a.correct for a in r0), f"{b1}_correct": sum(b.correct for b in r1),
                         "same_verdict_%": _pct(sum(a.correct == b.correct for a, b in zip(r0, r1)), len(r0), 1)})
    return rows


def agreement_summary(rows: Sequence[Mapping[str, Any]], backends: Sequence[str]) -> tuple[float, str] | None:
    """The mean of ``identical_completions_%`` over :func:`backend_agreement`'s rows (1 decimal)
    and a sentence naming the lowest; None for no rows."""
    if not rows:
        return None
    overall = sum(r["identical_completions_%"] for r in rows) / len(rows)
    worst = min(rows, key=lambda r: r["identical_completions_%"])
    return round(overall, 1), (f"On average {overall:.1f}% of greedy completions are identical across {backends[0]} "
                               f"and {backends[1]}; the lowest is {worst['identical_completions_%']}% "
                               f"({worst['model']}, {worst['task']}).")


# ----------------------------------------------------------------------------------------------
# Two protocols on a real model


def generation_cap(own: int, cap: int | None) -> int | None:
    """New-token budget: a protocol's ``own`` budget for a task, capped at ``cap`` (None: no cap).

    ``own == 0`` (scored from next-token probabilities, no generation) stays unbudgeted: None.
    PktError for a ``cap`` below 1.
    """
    if cap is not None and cap < 1:
        raise PktError(f"the new-token cap must be at least 1 (or None for none), got {cap}")
    if own == 0:
        return None
    return own if cap is None else min(own, cap)


def protocol_grid(model, *, limit: int | None, batch_size: int, max_new_tokens: int | None, seed: int = 0,
                  splits: Mapping[str, str] = REAL_SPLITS) -> dict[tuple[str, str], EvalResult]:
    """``model`` (a ``(model, tokenizer)`` pair) on each benchmark of ``splits`` under every protocol.

    Keyed ``(task, protocol)``; the same first ``limit`` questions for both protocols, Hugging Face
    backend with ``batch_size`` prompts per pass, generation capped by :func:`generation_cap`.
    """
    gen = evaluation.make_generator(model, "hf", batch_size=batch_size)
    real = {}
    for task, split in splits.items():
        for name, protocol in evaluation.PROTOCOLS.items():
            cap = generation_cap(protocol.max_new_tokens(task_info(task)), max_new_tokens)
            real[task, name] = evaluation.evaluate(model, task, split, protocol=name, limit=limit,
                                                   max_new_tokens=cap, generator=gen, seed=seed, progress=False)
    return real


def protocol_rows(real: Mapping[tuple[str, str], EvalResult]) -> list[dict[str, Any]]:
    """One row per (task, protocol): split, metric, score (2 decimals), Wilson 95% ci_low/ci_high
    (1 decimal), n, max_new_tokens, seconds (generation time)."""
    return [{"task": task, "split": r.split, "protocol": protocol, "metric": r.metric, "score": round(r.score, 2),
             "ci_low": round(r.ci95[0], 1), "ci_high": round(r.ci95[1], 1), "n": r.n,
             "max_new_tokens": r.max_new_tokens, "seconds": r.generate_s}
            for (task, protocol), r in real.items()]


def protocol_paired_tests(real: Mapping[tuple[str, str], EvalResult], tasks: Sequence[str],
                          a: str = "pkt", b: str = "open-instruct") -> list[dict[str, Any]]:
    """Per task, protocol ``a`` against ``b`` on the same questions: both scores (2 decimals), n,
    the discordant counts and the exact McNemar p-value (3 decimals; :func:`pktlib.evaluation.paired_test`)."""
    rows = []
    for task in tasks:
        ra, rb = real[task, a], real[task, b]
        t = evaluation.paired_test([r.correct for r in ra.records], [r.correct for r in rb.records])
        rows.append({"task": task, a: round(ra.score, 2), b: round(rb.score, 2), "n": t.n,
                     f"only {a} right": t.a_only, f"only {b} right": t.b_only, "p (exact McNemar)": round(t.p_value, 3)})
    return rows


def _counts(values, *, dropna: bool = True) -> dict:
    return pd.Series(list(values)).value_counts(dropna=dropna).to_dict()


def protocol_diagnostics(real: Mapping[tuple[str, str], EvalResult]) -> dict[str, Any]:
    """Counts that explain why the protocols disagree (needs gsm8k, mmlu, humaneval and mbpp).

    GSM8K under ``pkt``: completions with no number read, and those saying "answer is"; under
    open-instruct: how often the last number is the gold one. MMLU: ``pkt`` completions with no
    letter read and the letters read (None counted), open-instruct's letters. Code: the sandbox
    statuses per ``"<task>/<protocol>"``.
    """
    gsm_pkt, mmlu_pkt = real["gsm8k", "pkt"].records, real["mmlu", "pkt"].records
    return {
        "gsm8k_pkt_no_number_read": sum(r.extracted is None for r in gsm_pkt),
        "gsm8k_pkt_says_answer_is": sum("answer is" in r.completion.lower() for r in gsm_pkt),
        "gsm8k_oi_last_number_is_gold": sum(r.correct for r in real["gsm8k", "open-instruct"].records),
        "mmlu_pkt_no_letter_read": sum(r.extracted is None for r in mmlu_pkt),
        "mmlu_pkt_letters": _counts((r.extracted for r in mmlu_pkt), dropna=False),
        "mmlu_oi_letters": _counts(r.extracted for r in real["mmlu", "open-instruct"].records),
        "code_status": {f"{t}/{p}": _counts(r.status for r in real[t, p].records)
                        for t in ("humaneval", "mbpp") for p in evaluation.PROTOCOLS},
    }


def diagnostics_reading(d: Mapping[str, Any], n: int) -> str:
    """:func:`protocol_diagnostics` (of ``n`` questions per benchmark) as Markdown bullets."""
    return "\n".join([
        f"* **GSM8K.** Under the project's protocol {d['gsm8k_pkt_says_answer_is']} of {n} completions say "
        f"\"answer is\" and {d['gsm8k_pkt_no_number_read']} give no number to read; open-instruct reads the "
        f"last number of every output, which is the gold one {d['gsm8k_oi_last_number_is_gold']} times.",
        f"* **MMLU.** Generating under the project's protocol, {d['mmlu_pkt_no_letter_read']} of {n} completions "
        f"give no readable letter; letters read: {d['mmlu_pkt_letters']}. open-instruct's next-token "
        f"probabilities always pick one: {d['mmlu_oi_letters']}.",
        *[f"* **{key.split('/', 1)[0]}** ({key.split('/', 1)[1]}): sandbox outcomes {s}"
          for key, s in d["code_status"].items()],
    ])


def side_by_side(real: Mapping[tuple[str, str], EvalResult],
                 tasks: Sequence[str] = ("gsm8k", "mmlu", "humaneval")) -> pd.DataFrame:
    """The first question of each task under every protocol: prompt end (160 characters), output
    (240), what was read (60), gold (40), correct."""
    rows = []
    for task in tasks:
        for protocol in evaluation.PROTOCOLS:
            r = real[task, protocol].records[0]
            rows.append({"task": task, "protocol": protocol, "prompt (end)": r.prompt[-160:],
                         "output": r.completion[:240], "read": (r.extracted or "")[:60],
                         "gold": (r.gold or "")[:40], "correct": r.correct})
    return pd.DataFrame(rows)
