"""The one training loop: schedules, run folders, checkpoints, resume bit for bit."""
from __future__ import annotations

import json
import random

import pytest
import torch

from pktlib.errors import PktError
from pktlib.training import Checkpointed, RunDir, Schedule, one_cycle, read_log, train_steps


# ----------------------------------------------------------------------------------- schedules
def test_one_cycle_matches_torch_and_handles_short_runs():
    for total in (20, 40):
        opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        ref = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1.0, total_steps=total, pct_start=0.1,
                                                  anneal_strategy="cos", final_div_factor=1, cycle_momentum=False)
        for i in range(total):
            assert one_cycle(i, total) == pytest.approx(ref.get_last_lr()[0], abs=1e-12)
            assert Schedule("one-cycle", 3.0, total).lr_at(i) == pytest.approx(3 * ref.get_last_lr()[0], abs=1e-12)
            opt.step()
            ref.step()
    assert one_cycle(0, 10) == 1.0 and one_cycle(9, 10) == pytest.approx(1 / 25)  # OneCycleLR fails here


def test_cosine_warms_up_linearly_then_decays_to_its_floor():
    s = Schedule("cosine", 2.0, 100, {"warmup": 0.05, "final": 0.1})
    lrs = [s.lr_at(i) for i in range(100)]
    assert lrs[:5] == pytest.approx([0.4, 0.8, 1.2, 1.6, 2.0])  # 5 warm-up steps up to the peak
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:]))  # then never up again
    assert lrs[-1] == pytest.approx(0.2, rel=0.01)  # ending near final * lr
    assert Schedule("cosine", 1.0, 3, {"warmup": 0.05}).lr_at(0) == 1.0  # at least one warm-up step


def test_linear_warms_up_then_reaches_zero():
    s = Schedule("linear", 1.0, 10, {"warmup": 0.25})  # ceil(2.5) = 3 warm-up steps
    assert [s.lr_at(i) for i in range(10)] == pytest.approx([1 / 3, 2 / 3, 1, 1, 6 / 7, 5 / 7, 4 / 7, 3 / 7, 2 / 7, 1 / 7])
    assert Schedule("linear", 1.0, 10).lr_at(12) == 0.0
    assert Schedule("constant", 0.5, 1).lr_at(7) == 0.5
    with pytest.raises(PktError, match="unknown schedule 'step'"):
        Schedule("step", 1.0, 10)


# ----------------------------------------------------------------------------------- the loop
def _problem(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(64, 8, generator=g), torch.randn(64, 1, generator=g)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Dropout(0.2), torch.nn.Linear(16, 1))
    torch.manual_seed(seed)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return model, x, y


def _run(out, steps: int, *, crash_after: int | None = None, settings=None):
    """Train the toy problem in run folder ``out``; dropout and a Python RNG make resume non-trivial."""
    model, x, y = _problem()
    opt = torch.optim.AdamW(model.parameters(), lr=0.05)
    random.seed(0)

    def step(i):
        if crash_after is not None and i == crash_after:
            raise KeyboardInterrupt
        j = random.randrange(0, 48)  # Python RNG state is checkpointed too
        loss = torch.nn.functional.mse_loss(model(x[j:j + 16]), y[j:j + 16])
        loss.backward()
        return {"loss": loss.item()}

    state = Checkpointed(save=lambda d: torch.save(model.state_dict(), d / "model.pt"),
                         load=lambda d: model.load_state_dict(torch.load(d / "model.pt")))
    model.train()
    run = RunDir(out, settings or {"lr": 0.05, "steps": steps}, free=("steps",))
    res = train_steps(opt, step, steps=steps, schedule=Schedule("cosine", 0.05, steps), run=run, checkpointed=state,
                      clip=(list(model.parameters()), 1.0), save_at=lambda s: s % 3 == 0)
    return model, res


def test_resumed_run_equals_uninterrupted_bit_for_bit(tmp_path):
    full, res = _run(tmp_path / "a", 10)
    assert [r["step"] for r in res.log] == list(range(1, 11)) and res.resumed_from == 0
    assert res.log[0]["lr"] == Schedule("cosine", 0.05, 10).lr_at(0)
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path / "b", 10, crash_after=7)  # saved after steps 3 and 6, logged 7
    assert [r["step"] for r in read_log(tmp_path / "b")] == list(range(1, 8))
    resumed, res_b = _run(tmp_path / "b", 10)
    assert res_b.resumed_from == 6
    assert [r["loss"] for r in res_b.log] == [r["loss"] for r in res.log]  # rows past step 6 were redone
    for (n, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), n
    assert RunDir(tmp_path / "b", {"lr": 0.05, "steps": 12}, free=("steps",)).saved_steps() == [3, 6, 9, 10]


def test_run_folder_refuses_other_settings_and_tolerates_a_cut_log_line(tmp_path):
    _run(tmp_path / "a", 3)
    with pytest.raises(PktError, match=r"other settings .*'lr': \(0.05, 0.1\)"):
        RunDir(tmp_path / "a", {"lr": 0.1, "steps": 3}, free=("steps",))
    log = tmp_path / "a" / "log.jsonl"
    log.write_text(log.read_text() + '{"step": 4, "lo')  # a crash in the middle of a write
    assert [r["step"] for r in read_log(tmp_path / "a")] == [1, 2, 3]
    nested = RunDir(tmp_path / "n", {"config": {"lr": 1, "steps": 2}, "model": {"source": "x", "hash": "h"}},
                    free=("config.steps", "model.source"))
    RunDir(nested.path, {"config": {"lr": 1, "steps": 5}, "model": {"source": "y", "hash": "h"}},
           free=("config.steps", "model.source"))
    with pytest.raises(PktError, match="model.hash"):
        RunDir(nested.path, {"config": {"lr": 1, "steps": 5}, "model": {"source": "y", "hash": "other"}},
               free=("config.steps", "model.source"))
    assert json.loads((nested.path / "settings.json").read_text())["model"]["source"] == "y"


def test_keep_last_and_no_run_folder(tmp_path):
    model, x, y = _problem()
    model.eval()  # no dropout: the loss falls step after step
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    seen = []

    def step(i):
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        return {"loss": loss.item()}

    run = RunDir(tmp_path / "k", {})
    res = train_steps(opt, step, steps=5, schedule=Schedule("constant", 0.1, 5), run=run, keep_last=1,
                      after=lambda i, row: row.update(after=i), on_step=seen.append)
    assert run.saved_steps() == [5] and [r["after"] for r in res.log] == list(range(5)) and seen == res.log
    assert res.log[-1]["loss"] < res.log[0]["loss"]
    bare = train_steps(opt, step, steps=2, schedule=Schedule("constant", 0.1, 2))
    assert [r["step"] for r in bare.log] == [1, 2] and bare.resumed_from == 0
