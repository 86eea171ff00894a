"""Specialist teachers: the pocket pair's teacher-chat trained further on one family (paper Tables 2, 3, 6).

The paper asks whether a *stronger source* transfers better: WizardCoder / CodeLlama (code) and
WizardMath (math) stand in for the Llama-2 teacher. Those specialists were trained on much more
task data than the general model. The pocket analogue is the pair's ``teacher-chat`` fine-tuned
further on one family: its chat training data (the ``train`` split) plus ``fresh_train`` *fresh*
problems of the family (:func:`pktlib.data.suite.fresh_examples`: in no split and not in the base
corpus), round after round, until it **clearly beats** the plain teacher on that family:

* *clearly*: on ``decision_questions`` further fresh problems (never trained on; the test split
  is kept for the comparisons), the specialist answers more questions right than the plain
  teacher and an exact McNemar test (:func:`pktlib.analysis.stats.paired_test`) gives
  p < ``alpha``. The decision questions are unseen, like the test split's, so a specialist that
  wins them should win the test too. An earlier version decided on the ``extract`` and ``align``
  splits; their questions and answers are in the base corpus, and a math specialist won there
  (57.1 vs 45.5, p = 0.007) but not on the test split (46.3 vs 47.0): further chat training had
  recalled memorised answers rather than taught the arithmetic;
* only ``math`` and ``code`` have fresh problems (knowledge questions are about the suite's fixed
  fact base), so only they have specialists;
* the rounds are capped (``SpecialistConfig.max_rounds``); a specialist that never clears the
  test is still saved, with the decision "not clearly better" in its card;
* where the plain teacher misses fewer decision questions than any significant McNemar result
  needs (at ``alpha`` = 0.05, six discordant questions all in the specialist's favour), no
  specialist can clearly beat it: one round is trained and the card says "ceiling".

Each round is one :func:`pktlib.zoo.build.train_stage` (the pair's own training loop) over
:func:`pktlib.zoo.build.chat_batches` of the training examples (optionally
:func:`pktlib.zoo.build.with_replay` of base-corpus batches), at ``lr_scale`` times the chat
stage's learning rate, with the teacher's autocast. The checkpoint is
``<pair folder>/teacher-chat-<family>-<settings key>`` (:func:`specialist_name`: other settings
build another specialist instead of finding this one) with a card (:mod:`pktlib.zoo.cards`),
written under a lock, atomically; a round's run and each finished round are kept in
``<pair folder>/.runs/<name>`` so an interrupted build resumes. ``teacher-chat`` is only read.
On the command line: ``pkt zoo build --specialist <family>``.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Sequence

import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from pktlib.analysis.stats import correctness_string, paired_difference_interval, paired_test
from pktlib.cache import locked
from pktlib.data import Example, load_examples
from pktlib.data.suite import FAMILIES, SuiteConfig, base_corpus, fresh_examples, suite_file
from pktlib.errors import PktError
from pktlib.evaluation import evaluate
from pktlib.models import spec, weights_hash
from pktlib.records import atomic_dir, read_json, write_json
from pktlib.zoo.build import _stage_config, base_batches, chat_batches, train_stage, with_replay
from pktlib.zoo.cards import MAX_NEW_TOKENS, read_card, save_checkpoint
from pktlib.zoo.config import PairConfig, for_this_machine, get_preset, pair_dir

__all__ = ["SPECIALIST_FAMILIES", "SpecialistConfig", "Decision", "specialist_name", "specialist_data",
           "decision_correct", "min_discordant",
           "build_specialist", "read_decisions", "describe"]


@dataclass(frozen=True)
class SpecialistConfig:
    """How a specialist is trained and when it counts as clearly better (module docstring)."""

    family: str
    max_rounds: int = 3  # cap on the rounds of further training
    epochs: float = 1.0  # passes over the training examples per round
    lr_scale: float = 0.5  # times the chat stage's learning rate (cosine to 10% within each round)
    replay: float = 0.0  # base-corpus batches per chat batch (a specialist may forget the other families)
    fresh_train: int = 3000  # fresh problems trained on beside the family's train split (more task data)
    decision_questions: int = 300  # further fresh problems the decision scores (never trained on)
    alpha: float = 0.05  # McNemar level of "clearly better"

    def __post_init__(self):
        if self.family not in SPECIALIST_FAMILIES:
            raise PktError(f"no specialist for family {self.family!r}: only {', '.join(SPECIALIST_FAMILIES)} have "
                           f"fresh problems to train and decide on (of {', '.join(FAMILIES)})")
        if (self.max_rounds < 1 or self.epochs <= 0 or self.lr_scale <= 0 or self.replay < 0 or self.fresh_train < 0
                or self.decision_questions < 1):
            raise PktError(f"SpecialistConfig needs max_rounds >= 1, epochs > 0, lr_scale > 0, replay >= 0, "
                           f"fresh_train >= 0 and decision_questions >= 1; got max_rounds={self.max_rounds}, "
                           f"epochs={self.epochs}, lr_scale={self.lr_scale}, replay={self.replay}, "
                           f"fresh_train={self.fresh_train}, decision_questions={self.decision_questions}")

    def key(self) -> str:
        """Eight hex digits of the settings (family excluded): the checkpoint folder's suffix."""
        blob = json.dumps({k: v for k, v in asdict(self).items() if k != "family"}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:8]


@dataclass(frozen=True)
class Decision:
    """The held-out comparison after one round: specialist (a) against the plain teacher (b)."""

    round: int
    n: int
    specialist: float  # score (0-100) on the decision questions
    teacher: float
    specialist_only: int  # questions only the specialist answers right
    teacher_only: int
    p_value: float  # exact McNemar, two-sided
    interval: tuple[float, float]  # 95% interval of specialist - teacher (points)
    clearly_better: bool


SPECIALIST_FAMILIES = ("math", "code")  # the families with fresh problems (pktlib.data.suite.fresh_examples)


def specialist_name(config: SpecialistConfig) -> str:
    """The checkpoint folder's name: ``teacher-chat-<family>-<config.key()>``."""
    return f"teacher-chat-{config.family}-{config.key()}"


def specialist_data(config: SpecialistConfig,
                    suite: SuiteConfig = SuiteConfig()) -> tuple[list[Example], list[Example]]:
    """(training examples, decision questions) of ``config``: the family's train split plus the
    fresh problems after the first ``decision_questions``, and those first ones (disjoint)."""
    fresh = fresh_examples(config.family, config.decision_questions + config.fresh_train, suite=suite)
    split = load_examples(suite_file(f"pocket-{config.family}", "train", suite=suite))
    train = split + fresh[config.decision_questions:]
    return train, fresh[:config.decision_questions]


def min_discordant(alpha: float) -> int:
    """The fewest discordant questions, all favouring one system, for an exact McNemar p < ``alpha``."""
    n = 1
    while paired_test([True] * n, [False] * n).p_value >= alpha:
        n += 1
    return n


def decision_correct(model: Any, family: str, questions: Sequence[Example]) -> list[bool]:
    """Per-question correctness of ``model`` (a folder or ``(model, tokenizer)``) on the decision
    ``questions`` of ``pocket-<family>`` (greedy, :data:`MAX_NEW_TOKENS`)."""
    ev = evaluate(model, f"pocket-{family}", "decision", examples=questions, max_new_tokens=MAX_NEW_TOKENS[family],
                  batch_size=64, progress=False)
    return [r.correct for r in ev.records]


def _decide(round_: int, spec_ok: list[bool], teacher_ok: list[bool], alpha: float) -> Decision:
    t = paired_test(spec_ok, teacher_ok)
    lo, hi = paired_difference_interval(spec_ok, teacher_ok)
    n = len(spec_ok)
    return Decision(round_, n, 100 * sum(spec_ok) / n, 100 * sum(teacher_ok) / n, t.a_only, t.b_only, t.p_value,
                    (lo, hi), t.a_only > t.b_only and t.p_value < alpha)


def read_decisions(checkpoint: str | Path) -> dict[str, Any]:
    """The ``specialist`` section of a specialist checkpoint's card (config, decisions, verdict)."""
    card = read_card(checkpoint)
    if "specialist" not in card:
        raise PktError(f"{checkpoint} is not a specialist checkpoint (its card has no 'specialist' section)")
    return card["specialist"]


def describe(checkpoint: str | Path) -> str:
    """The specialist's rounds and verdict as text lines (what ``pkt zoo build --specialist`` prints)."""
    info = read_decisions(checkpoint)
    lines = [f"round {d['round']}: specialist {d['specialist']:.1f} vs teacher {d['teacher']:.1f} on {d['n']} fresh "
             f"questions (+{d['specialist_only']}/-{d['teacher_only']}, McNemar p = {d['p_value']:.2g})"
             for d in info["rounds"]]
    return "\n".join(lines + [f"{info['verdict']}: {checkpoint}"])


def build_specialist(family: str, *, preset: str = "default", seed: int = 0, config: SpecialistConfig | None = None,
                     pair_config: PairConfig | None = None, root: Path | None = None,
                     progress: bool = True) -> Path:
    """Train (or find) ``<pair folder>/<specialist_name(config)>``; returns its folder.

    ``preset``/``seed`` name the pair (it must be built: :func:`pktlib.zoo.build_pair`);
    ``pair_config``/``root`` override them as in :func:`pktlib.zoo.build_pair`. ``config``
    defaults to ``SpecialistConfig(family)``; the folder is named after its settings, so a
    finished specialist with these settings is returned as it is. Raises PktError if teacher-chat
    is missing, ``family`` has no specialist (:data:`SPECIALIST_FAMILIES`) or a round's run folder
    holds other settings.
    """
    spec_cfg = config or SpecialistConfig(family)
    if spec_cfg.family != family:
        raise PktError(f"build_specialist({family!r}) got a SpecialistConfig for {spec_cfg.family!r}")
    cfg = for_this_machine(pair_config) if pair_config else get_preset(preset)
    root = Path(root or pair_dir(preset, seed))
    name = specialist_name(spec_cfg)
    out, source = root / name, root / "teacher-chat"
    if (out / "card.json").is_file():
        return out
    if not (source / "card.json").is_file():
        raise PktError(f"{source} is not built: build the pair first "
                       f"(pkt zoo build --preset {preset} --seed {seed} --specialist {family})")
    with locked(root / f".{name}.lock"):
        if (out / "card.json").is_file():  # another process finished it while this one waited
            return out
        return _build(spec_cfg, cfg, root, source, out, preset=preset, seed=seed, progress=progress)


def _build(sc: SpecialistConfig, cfg: PairConfig, root: Path, source: Path, out: Path, *, preset: str, seed: int,
           progress: bool) -> Path:
    t0 = time.perf_counter()
    runs = root / ".runs" / out.name
    runs.mkdir(parents=True, exist_ok=True)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(source)
    model = LlamaForCausalLM.from_pretrained(source, dtype=torch.float32)  # a copy: teacher-chat is only read
    source_hash = weights_hash(source)
    settings = {"config": asdict(sc), "source": source_hash, "pair": cfg.key()}
    state_file = runs / "state.json"
    state = read_json(state_file) if state_file.is_file() else None
    if state is not None and state["settings"] != json.loads(json.dumps(settings)):
        raise PktError(f"{runs} holds a specialist build with other settings (saved {state['settings']}, now "
                       f"{settings}); delete it to start over")
    examples, questions = specialist_data(sc, cfg.suite)
    if state is None:
        plain = decision_correct((model, tokenizer), sc.family, questions)
        state = {"settings": settings, "teacher_correct": correctness_string(plain), "rounds": [], "logs": []}
        write_json(state_file, state)
    teacher_ok = [c == "1" for c in state["teacher_correct"]]
    need = min_discordant(sc.alpha)
    ceiling = teacher_ok.count(False) < need
    if state["rounds"]:  # resume after the last finished round
        model.load_state_dict(load_file(str(runs / f"round{len(state['rounds'])}" / "model.safetensors")))
    round_cfg = replace(cfg, chat=replace(cfg.chat, epochs=sc.epochs))
    chat_cfg = _stage_config(cfg, "teacher", "chat")  # the chat stage at the teacher's width
    train_cfg = replace(chat_cfg, lr=chat_cfg.lr * sc.lr_scale)
    base = base_batches(tokenizer, base_corpus(cfg.suite), cfg, seed=seed) if sc.replay > 0 else []
    while not _finished(state, sc, ceiling):
        k = len(state["rounds"]) + 1
        batches = chat_batches(tokenizer, examples, round_cfg, seed=seed + 100 * k)
        if sc.replay > 0:
            batches = with_replay(batches, base, sc.replay)
        log = train_stage(model, batches, train_cfg, seed=seed + 100 * k, autocast=cfg.teacher.autocast,
                          run_dir=runs / f"round{k}-run")
        ok = decision_correct((model, tokenizer), sc.family, questions)
        decision = _decide(k, ok, teacher_ok, sc.alpha)
        with atomic_dir(runs / f"round{k}") as tmp:
            save_file(model.state_dict(), str(tmp / "model.safetensors"))
        state["rounds"].append(asdict(decision))
        state["logs"].append(asdict(log))
        write_json(state_file, state)
        shutil.rmtree(runs / f"round{k}-run", ignore_errors=True)
        if progress:
            print(f"{out.name} round {k}: {decision.specialist:.1f} vs {decision.teacher:.1f} on {decision.n} fresh "
                  f"questions (+{decision.specialist_only}/-{decision.teacher_only}, p = {decision.p_value:.2g})")
    last = state["rounds"][-1]
    verdict = ("clearly better" if last["clearly_better"] else "ceiling" if ceiling else "not clearly better")
    card = read_card(source)
    training = dict(card["training"])
    for i, log in enumerate(state["logs"], 1):
        training[f"{sc.family} round {i}"] = log
    card.update({"name": out.name, "preset": preset, "seed": seed, "architecture": spec(model.config).to_dict(),
                 "training": training, "scores": None,
                 "specialist": {"family": sc.family, "source": "teacher-chat", "source_weights": source_hash,
                                "config": asdict(sc), "decision_questions": len(teacher_ok),
                                "min_discordant": need, "rounds": state["rounds"], "verdict": verdict,
                                "seconds": round(time.perf_counter() - t0, 1)}})
    save_checkpoint(model, tokenizer, out, card)
    shutil.rmtree(runs, ignore_errors=True)
    return out


def _finished(state: dict[str, Any], sc: SpecialistConfig, ceiling: bool) -> bool:
    rounds = state["rounds"]
    if not rounds:
        return False
    return rounds[-1]["clearly_better"] or ceiling or len(rounds) >= sc.max_rounds
