"""The book's chapters: notebooks hold no logic of their own, and every one runs on the tiny pair.

The slow test executes every notebook with papermill (``pkt run``, as the book does) on the
``tiny`` pocket-pair preset in a fresh cache, with small settings passed as parameters (the
notebooks' defaults are the book's), and fails if any chapter raises.
"""
from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import nbformat
import papermill as pm
import pytest

from pktlib import zoo

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))

# Per chapter: the parameters of the tiny run (as few questions, seeds and steps as still exercise
# every cell). "{tmp}" is replaced by the run's scratch folder, "{pair}" by the tiny pair's folder.
TINY: dict[str, dict] = {
    "models_and_tasks": {},
    "pocket_pair": {"preset": "tiny", "limit": 8, "n_samples": 1},
    "evaluation": {"preset": "tiny", "limit": 4, "backends": ["hf"], "real_limit": 2, "real_batch_size": 2,
                   "real_max_new_tokens": 16},
    "postalign": {"preset": "tiny", "families": ["math"], "seeds": [0, 1], "n_train": 16, "epochs": 1,
                  "batch_size": 16, "micro_batch": 16, "eval_limit": 4, "extract_limit": 4,
                  "run_dir": "{tmp}/postalign-runs"},
    "prealign_unaligned": {"preset": "tiny", "families": ["math"], "seeds": [0, 1], "eval_limit": 4, "extract_limit": 4,
                           "run_dir": "{tmp}/prealign-runs"},
    "attribution": {"preset": "tiny", "n_examples": 4, "k": 4},
    "laten": {"preset": "tiny", "tasks": ["pocket-math"], "seeds": [0, 1], "transfer_rates": [0.1, 0.2],
              "limit": 4, "align_batch": 4, "max_new_tokens": 16, "run_root": "{tmp}/laten-runs",
              "sweep_families": ["math"], "sweep_lrs": [3e-5, 3e-2], "sweep_steps": [1], "sweep_seeds": [0, 1],
              "sweep_limit": 4},
    "ethological_similarity": {"preset": "tiny", "n_texts": 12},
    "structural_similarity": {"preset": "tiny", "n_texts": 4},
    "delta_ranges": {"preset": "tiny", "n_texts": 4, "limit": 4},
    # The tiny teacher stands in for SmolLM2: attributing a 30-layer model with a 49k vocabulary
    # takes minutes on a CPU (loading its GGUF file is tested in test_models).
    "real_model": {"preset": "tiny", "model": "{pair}/teacher-chat", "n_texts": 8,
                   "prompts": [["The capital of France is", " Paris"], ["The capital of Italy is", " Rome"]]},
    "reproduce": {},
    # The tiny pocket pair stands in for the real pair (`make real-pair`, 10 GiB, not in CI).
    "real_pair_scores": {"pair": "{pair}", "limits": {"gsm8k": 2, "mmlu": 4, "humaneval": 2, "mbpp": 2},
                         "backend": "hf", "max_new_tokens": 8, "score_dir": "{tmp}/pair-scores", "progress": False},
    "real_pair_cka": {"pair": "{pair}", "n_texts": 6, "modules": ["up_proj", "o_proj"]},
    "real_pair_prealign": {"pair": "{pair}", "n_questions": {"gsm8k": 2, "mbpp": 2}, "extract_limit": 2,
                           "hidden": ["pca"], "backend": "hf", "max_new_tokens": 8, "score_dir": "{tmp}/pair-scores",
                           "progress": False},
    "real_pair_postalign": {"pair": "{pair}", "n_questions": {"gsm8k": 2}, "n_align": 4, "inits": ["random", "seeking"],
                            "epochs": 1, "batch_size": 4, "extract_limit": 2, "torch_threads": 1, "backend": "hf",
                            "max_new_tokens": 8, "score_dir": "{tmp}/pair-scores", "run_dir": "{tmp}/postalign-runs",
                            "progress": False},
    "real_pair_laten": {"pair": "{pair}", "tasks": ["gsm8k"], "n_questions": {"gsm8k": 2}, "seeds": [0],
                        "align_batch": 3, "max_length": 128, "torch_threads": 1, "backend": "hf", "max_new_tokens": 8,
                        "score_dir": "{tmp}/pair-scores", "run_dir": "{tmp}/laten-real", "progress": False},
    "real_pair_neurons": {"pair": "{pair}", "tasks": ["gsm8k"], "n_examples": 2, "n_layers": 1, "n_tokens": 3},
    "real_pair_distillation": {"pair": "{pair}", "budgets": [4], "seeds": [0], "batch_size": 4, "micro_batch": 2,
                               "max_length": 128, "n_questions": {"gsm8k": 2}, "torch_threads": 1, "backend": "hf",
                               "max_new_tokens": 8, "score_dir": "{tmp}/pair-scores", "run_dir": "{tmp}/distill-real",
                               "laten_record": "{tmp}/book/real_pair_laten.record.json", "progress": False},
    "distillation": {"preset": "tiny", "families": ["math"], "budgets": [8], "seeds": [0], "eval_limit": 4,
                     "torch_threads": 1, "run_dir": "{tmp}/distill-runs", "laten_record": "{tmp}/book/laten.record.json"},
    "specialist_sources": {"preset": "tiny", "specialist_families": ["math"], "families": ["math"], "max_rounds": 1,
                           "round_epochs": 0.05, "fresh_train": 40, "decision_questions": 8, "seeds": [0, 1], "limit": 4, "n_train": 16, "pa_epochs": 1,
                           "extract_limit": 4, "laten_steps": 1, "align_batch": 4, "run_dir": "{tmp}/specialist-runs"},
    "scorecard": {"records_dir": "{tmp}/book", "other_builds": []},  # run last: it reads the other chapters' records
}


def _code(nb_path: Path) -> list[str]:
    return [c.source for c in nbformat.read(nb_path, as_version=4).cells if c.cell_type == "code"]


def test_every_chapter_has_tiny_parameters_it_accepts():
    assert sorted(TINY) == sorted(p.stem for p in NOTEBOOKS)
    for nb in NOTEBOOKS:
        params = pm.inspect_notebook(str(nb))
        unknown = set(TINY[nb.stem]) - set(params)
        assert not unknown, f"{nb.name}: the tiny run sets parameters the notebook does not have: {unknown}"
        uses_pair = any("pocket_pair(" in src for src in _code(nb))
        # A chapter on the pocket pair must let the run pick the preset, or it builds the default pair.
        assert not uses_pair or TINY[nb.stem].get("preset") == "tiny", f"{nb.name} needs a `preset` parameter"


def test_notebooks_define_no_functions_or_classes():
    for nb in NOTEBOOKS:
        for i, src in enumerate(_code(nb)):
            src = "\n".join(l for l in src.splitlines() if not l.lstrip().startswith(("%", "!")))
            defs = [n.name for n in ast.walk(ast.parse(src))
                    if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
            assert not defs, f"{nb.name} code cell {i} defines {defs}: move it into pktlib"


def _params(name: str, tmp: Path) -> list[str]:
    """``-p NAME VALUE`` arguments of ``pkt run`` (which reads a VALUE as JSON when it parses)."""
    args = []
    for key, value in TINY[name].items():
        if isinstance(value, str):
            value = value.replace("{tmp}", str(tmp)).replace("{pair}", str(zoo.pair_dir("tiny", 0)))
        # True/False as papermill spells them (JSON's true/false would reach the notebook as strings)
        args += ["-p", key, value if isinstance(value, str) else str(value) if isinstance(value, bool) else json.dumps(value)]
    return args


def _run(nb: Path, tmp: Path, env: dict[str, str]) -> tuple[str, float, str | None]:
    out = tmp / "book" / nb.name
    cmd = [str(Path(sys.executable).with_name("pkt")), "run", str(nb), "-o", str(out), *_params(nb.stem, tmp)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        return nb.stem, seconds, (proc.stdout + proc.stderr)[-3000:]
    return nb.stem, seconds, None


@pytest.mark.slow
def test_every_chapter_runs_on_the_tiny_pair(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("PKT_CACHE", str(cache))
    zoo.build_pair("tiny", progress=False)  # once, before the chapters that share it start
    env = {**os.environ, "PKT_CACHE": str(cache), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    chapters = [nb for nb in NOTEBOOKS if nb.stem != "scorecard"]
    # Two chapters at a time (CI has two cores); each runs in its own kernel.
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(lambda nb: _run(nb, tmp_path, env), chapters))
    results.append(_run(ROOT / "notebooks" / "scorecard.ipynb", tmp_path, env))
    print("\n".join(f"{name}: {seconds:.0f} s" for name, seconds, _ in results))
    failed = {name: err for name, _, err in results if err}
    assert not failed, "chapters failed on the tiny pair:\n" + "\n\n".join(f"== {k}\n{v}" for k, v in failed.items())
    for nb in NOTEBOOKS:
        record = json.loads((tmp_path / "book" / f"{nb.stem}.record.json").read_text())
        assert record["metrics"], f"{nb.stem} logged no metrics"
    score_rec = json.loads((tmp_path / "book" / "scorecard.record.json").read_text())
    assert score_rec["metrics"]["n_records"] == len(NOTEBOOKS) - 1
    methods = {r["method"] for r in score_rec["metrics"]["project_scores"]}
    assert {"student", "teacher", "laten", "seeking-unaligned", "postalign-seeking-n16"} <= methods
