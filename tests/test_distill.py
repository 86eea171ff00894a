"""Distillation baselines through TRL (pktlib.distill) on tiny models built here.

Every method: the loss goes down, the teacher's outputs drive the update (another teacher gives
another student), the teacher is bit-identical afterwards and the caller's student untouched.
Supervised KD's first logged loss equals the forward KL(teacher || student) on the gold answer
tokens computed here independently of TRL.
"""
from __future__ import annotations

import os

import pytest
import torch

from conftest import make_model
from pktlib.data import Example, collate, tokenize_example
from pktlib.distill import METHODS, budget_examples, distill
from pktlib.errors import PktError

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

EXAMPLES = [Example([{"role": "user", "content": f"What is {a} + {b}?"},
                     {"role": "assistant", "content": f"So the answer is {a + b}."}]) for a in (1, 3) for b in (2, 4, 5, 7)]
SMALL = dict(hidden_size=32, intermediate_size=48, n_heads=4)


@pytest.fixture(scope="module")
def models(tokenizer):
    student = make_model("llama", tokenizer=tokenizer, n_layers=1, seed=0, **SMALL)
    teachers = [make_model("llama", tokenizer=tokenizer, n_layers=2, seed=s, **SMALL) for s in (1, 2)]
    return student, teachers


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _run(student, teacher, tok, method, out, **kw):
    args = dict(method=method, examples=EXAMPLES, out_dir=out, epochs=4, batch_size=8, micro_batch=8, lr=1e-2,
                max_new_tokens=12, progress=False)
    return distill((student, tok), (teacher, tok), "pocket-math", **{**args, **kw})


def _forward_kl_on_gold(student, teacher, tok) -> float:
    """Mean over answer tokens of KL(teacher || student), by hand (temperature 1)."""
    items = [tokenize_example(tok, ex) for ex in EXAMPLES]
    b = collate(items, tok.pad_token_id)
    with torch.no_grad():
        s = torch.log_softmax(student(input_ids=b.input_ids, attention_mask=b.attention_mask).logits[:, :-1], -1)
        t = torch.log_softmax(teacher(input_ids=b.input_ids, attention_mask=b.attention_mask).logits[:, :-1], -1)
    mask = b.labels[:, 1:] != -100
    kl = (t.exp() * (t - s)).sum(-1)  # (B, T-1)
    return float(kl[mask].mean())


@pytest.mark.parametrize("method", list(METHODS))
def test_each_method_learns_from_the_teacher_and_updates_only_the_student(method, models, tokenizer, tmp_path):
    student, (teacher, other) = models
    s0, t0, o0 = _state(student), _state(teacher), _state(other)
    res = _run(student, teacher, tokenizer, method, tmp_path / "a")
    assert res.steps == 4 and len(res.log) == 4, res.log
    losses = [l for _, l in res.curve()]
    assert losses[-1] < losses[0], f"{method}: loss did not decrease: {losses}"
    # the teacher is bit-identical and the caller's student untouched; the distilled student moved
    assert _same(_state(teacher), t0), f"{method} changed the teacher"
    assert _same(_state(student), s0), f"{method} changed the caller's student"
    trained, _ = res.load_student()
    assert not _same(_state(trained), s0)
    # another teacher (same data, seed and student) gives another update
    res_b = _run(student, other, tokenizer, method, tmp_path / "b")
    assert _same(_state(other), o0)
    trained_b, _ = res_b.load_student()
    delta = max(float((trained.state_dict()[k] - trained_b.state_dict()[k]).abs().max()) for k in s0)
    assert delta > 1e-4, f"{method}: the teacher made no difference to the student (max diff {delta})"


def test_supervised_kd_is_forward_kl_on_the_gold_answers(models, tokenizer, tmp_path):
    student, (teacher, _) = models
    expected = _forward_kl_on_gold(student, teacher, tokenizer)
    res = _run(student, teacher, tokenizer, "supervised-kd", tmp_path / "kd", epochs=2)
    # the first step, over all examples: its logged loss is that of the untrained student
    assert res.log[0]["loss"] == pytest.approx(expected, rel=1e-3), (res.log, expected)
    trained, _ = res.load_student()
    assert _forward_kl_on_gold(trained, teacher, tokenizer) < expected


def test_seqkd_trains_on_the_teachers_greedy_answers(models, tokenizer, tmp_path):
    from pktlib.data import format_prompt, load_examples
    from pktlib.evaluation import HFGenerator, stop_strings

    student, (teacher, _) = models
    res = _run(student, teacher, tokenizer, "seqkd", tmp_path / "seq", epochs=1)
    saved = load_examples(tmp_path / "seq" / "teacher_answers.jsonl")
    greedy = HFGenerator(teacher, tokenizer).generate([format_prompt(e.messages) for e in EXAMPLES], 12,
                                                      stop_strings(tokenizer))
    assert [e.answer for e in saved] == [g.strip() for g in greedy]
    assert [e.meta["gold_answer"] for e in saved] == [e.answer for e in EXAMPLES]
    assert res.config.max_new_tokens == 12


class _Labelled:
    """A generator opener with a ``label``, as :meth:`pktlib.experiments.real_pair.SavedScorer.opener` makes."""

    def __init__(self, open_, label):
        self.open_, self.label = open_, label

    def __call__(self):
        return self.open_()


def test_seqkd_takes_its_teacher_answers_from_the_backend_it_is_given(models, tokenizer, tmp_path):
    """A ``teacher_generator`` (a vLLM engine on the real pair) is opened once, only while the
    answers are generated, closed after, and its answers are the training targets; a finished
    run in the same folder opens nothing, nor does another seed (the answers are shared)."""
    from contextlib import contextmanager

    from pktlib.data import format_prompt, load_examples
    from pktlib.evaluation import HFGenerator, stop_strings

    student, (teacher, other) = models
    events = []

    @contextmanager
    def serve_other():
        # another model's answers prove that the targets come from the backend, not from `teacher`
        events.append("open")
        try:
            yield HFGenerator(other, tokenizer)
        finally:
            events.append("close")

    res = _run(student, teacher, tokenizer, "seqkd", tmp_path / "seq", epochs=1, teacher_generator=serve_other,
               answers_dir=tmp_path / "answers")
    assert events == ["open", "close"]
    saved = load_examples(tmp_path / "seq" / "teacher_answers.jsonl")
    greedy = HFGenerator(other, tokenizer).generate([format_prompt(e.messages) for e in EXAMPLES], 12,
                                                    stop_strings(tokenizer))
    assert [e.answer for e in saved] == [g.strip() for g in greedy]
    assert {e.meta["teacher_backend"] for e in saved} == {"hf"}
    again = _run(student, teacher, tokenizer, "seqkd", tmp_path / "seq", epochs=1, teacher_generator=serve_other)
    assert again.from_record and events == ["open", "close"]
    # methods trained on the gold answers never open it
    _run(student, teacher, tokenizer, "supervised-kd", tmp_path / "kd", epochs=1, teacher_generator=serve_other)
    assert events == ["open", "close"]
    # another seed in another folder reuses the shared answers; another answer budget generates anew
    seed1 = _run(student, teacher, tokenizer, "seqkd", tmp_path / "seq-s1", epochs=1, seed=1,
                 teacher_generator=serve_other, answers_dir=tmp_path / "answers")
    assert events == ["open", "close"] and not seed1.from_record
    assert load_examples(tmp_path / "seq-s1" / "teacher_answers.jsonl") == saved
    _run(student, teacher, tokenizer, "seqkd", tmp_path / "seq-t8", epochs=1, max_new_tokens=8,
         teacher_generator=serve_other, answers_dir=tmp_path / "answers")
    assert events == ["open", "close"] * 2
    # a labelled backend (its settings, e.g. "vllm-bfloat16") keeps its own answers: another dtype's
    # greedy answers differ, so they are not shared with the unlabelled backend's or another label's
    labelled = {}
    for label in ("vllm-bfloat16", "vllm-float32", "vllm-bfloat16"):
        labelled[label] = _Labelled(serve_other, label)
        _run(student, teacher, tokenizer, "seqkd", tmp_path / f"seq-{label}-{len(events)}", epochs=1,
             teacher_generator=labelled[label], answers_dir=tmp_path / "answers")
    assert events == ["open", "close"] * 4  # one generation per label, the second bfloat16 run shares it
    saved = load_examples(next(tmp_path.glob("seq-vllm-float32-*")) / "teacher_answers.jsonl")
    assert {e.meta["teacher_backend"] for e in saved} == {"vllm-float32"}


def test_runs_resume_and_finished_runs_are_not_repeated(models, tokenizer, tmp_path, monkeypatch):
    from transformers import TrainerCallback

    import pktlib.distill as dm

    student, (teacher, _) = models
    full = _run(student, teacher, tokenizer, "supervised-kd", tmp_path / "full", batch_size=4, micro_batch=4)

    real = dm._mark_complete_callback

    class Interrupt(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == 5:
                raise KeyboardInterrupt

    class Both(TrainerCallback):
        def __init__(self):
            self.mark, self.stop = real(), Interrupt()

        def on_save(self, *a, **kw):
            return self.mark.on_save(*a, **kw)

        def on_step_end(self, *a, **kw):
            return self.stop.on_step_end(*a, **kw)

    monkeypatch.setattr(dm, "_mark_complete_callback", Both)
    with pytest.raises(KeyboardInterrupt):
        _run(student, teacher, tokenizer, "supervised-kd", tmp_path / "cut", batch_size=4, micro_batch=4, save_every=2)
    assert not (tmp_path / "cut" / "result.json").exists() and not (tmp_path / "cut" / "student").exists()
    monkeypatch.setattr(dm, "_mark_complete_callback", real)
    resumed = _run(student, teacher, tokenizer, "supervised-kd", tmp_path / "cut", batch_size=4, micro_batch=4,
                   save_every=2)
    assert resumed.resumed_from == 4 and resumed.steps == full.steps == 8
    a, b = full.load_student()[0].state_dict(), resumed.load_student()[0].state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    again = _run(student, teacher, tokenizer, "supervised-kd", tmp_path / "cut", batch_size=4, micro_batch=4,
                 save_every=2)
    assert again.from_record and again.log == resumed.log
    with pytest.raises(PktError, match="other settings"):
        _run(student, teacher, tokenizer, "supervised-kd", tmp_path / "cut", lr=1e-3)


def test_bad_input_is_one_clear_error(models, tokenizer, tmp_path):
    from conftest import make_tokenizer

    student, (teacher, _) = models
    with pytest.raises(PktError, match="unknown distillation method"):
        _run(student, teacher, tokenizer, "dpo", tmp_path / "x")
    other_tok = make_tokenizer(vocab_size=300)
    small = make_model("llama", tokenizer=other_tok, n_layers=1, **SMALL)
    with pytest.raises(PktError, match="vocab_size .* != student vocab_size"):
        distill((small, other_tok), (teacher, tokenizer), "pocket-math", examples=EXAMPLES, out_dir=tmp_path / "y")
    with pytest.raises(PktError, match="multiple of `micro_batch`"):
        _run(student, teacher, tokenizer, "seqkd", tmp_path / "z", batch_size=6, micro_batch=4)


def test_data_budgets_match_laten_and_the_train_split():
    from pktlib.data import load_task
    from pktlib.laten import default_steps

    ex, label = budget_examples("pocket-math", "laten")
    steps = default_steps("pocket-math")
    assert label == "laten" and len(ex) == steps + len(load_task("pocket-math", "align")) <= 100
    assert [e.id for e in ex[:steps]] == [e.id for e in load_task("pocket-math", "extract")[:steps]]
    ex, label = budget_examples("pocket-code", 50)
    assert label == "train:50" and [e.id for e in ex] == [e.id for e in load_task("pocket-code", "train")[:50]]
    with pytest.raises(PktError, match="unknown data budget"):
        budget_examples("pocket-code", "all")
    with pytest.raises(PktError, match="train examples"):
        budget_examples("pocket-code", 10**6)


def test_full_finetuning_trains_every_student_parameter(models, tokenizer, tmp_path):
    student, (teacher, _) = models
    t0 = _state(teacher)
    res = _run(student, teacher, tokenizer, "supervised-kd", tmp_path / "full", lora=False, epochs=2)
    assert res.trainable_parameters == sum(p.numel() for p in student.parameters())
    trained = res.load_student()[0].state_dict()
    moved = [k for k, v in student.state_dict().items() if not torch.equal(trained[k], v)]
    assert "lm_head.weight" in moved and any("mlp.gate_proj" in k for k in moved)
    assert _same(_state(teacher), t0)
    with pytest.raises(PktError, match="tokenizer"):
        distill(student, (teacher, tokenizer), "pocket-math", examples=EXAMPLES, out_dir=tmp_path / "no-tok")


def test_chat_template_shapes_training_sequences_and_teacher_prompts(models, tokenizer, tmp_path):
    """``template="chat"``: SeqKD's teacher is prompted, and every method trains, in the tokenizer's
    own chat format (as the real pair's evaluator prompts); the default format is not used."""
    import copy

    from pktlib.data import format_prompt, load_examples
    from pktlib.distill import _dataset
    from pktlib.evaluation import HFGenerator, stop_strings

    student, (teacher, _) = models
    chat = copy.deepcopy(tokenizer)
    chat.chat_template = "{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}[assistant] "
    rows = _dataset(chat, EXAMPLES, 512, "chat")
    ex = EXAMPLES[0]
    expected = tokenize_example(chat, ("[user] What is 1 + 2?\n[assistant] ", ex.answer))
    assert rows[0]["input_ids"] == expected["input_ids"] and rows[0]["labels"] == expected["labels"]
    assert rows[0]["input_ids"] != tokenize_example(chat, ex)["input_ids"]  # not the default format
    res = _run(student, teacher, chat, "seqkd", tmp_path / "seq", epochs=1, template="chat")
    assert res.config.template == "chat"
    saved = load_examples(tmp_path / "seq" / "teacher_answers.jsonl")
    greedy = HFGenerator(teacher, chat).generate([format_prompt(e.messages, tokenizer=chat, template="chat")
                                                  for e in EXAMPLES], 12, stop_strings(chat))
    assert [e.answer for e in saved] == [g.strip() for g in greedy]


def test_a_run_saved_before_a_setting_existed_resumes_at_its_default(models, tokenizer, tmp_path):
    import json

    student, (teacher, _) = models
    first = _run(student, teacher, tokenizer, "supervised-kd", tmp_path / "old", epochs=1)
    cfg_path = tmp_path / "old" / "distill_config.json"
    cfg = json.loads(cfg_path.read_text())
    del cfg["template"]  # as written before `template` existed
    cfg_path.write_text(json.dumps(cfg))
    again = _run(student, teacher, tokenizer, "supervised-kd", tmp_path / "old", epochs=1)
    assert again.from_record and again.log == first.log
    with pytest.raises(PktError, match="template"):
        _run(student, teacher, tokenizer, "supervised-kd", tmp_path / "old", epochs=1, template="chat")
