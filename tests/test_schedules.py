"""The infinite learning-rate schedules (arXiv:2403.08763, METHODS.md section 15): the piecewise formulas by hand,
continuity at the phase boundaries, the peak at the end of warm-up and the minimum at the end of annealing; and
that a run extended with --resume gets the learning rates of a run started with the longer max_steps."""

from __future__ import annotations

import itertools
import math
import re

import pytest
import torch
from safetensors.torch import load_file

from lmadapt.recipes.finetune import train
from lmadapt.training.config import TrainConfig
from lmadapt.training.resume import schedule_problem
from lmadapt.training.schedules import Schedule, lr_factor

PEAK, CONST, MIN = 1.0, 0.5, 0.1


def infinite_by_hand(step: int, *, warmup: int, cooldown: int, total: int, anneal_steps: int) -> float:
    """METHODS.md 15's four phases written out, t = step; warm-up at (t + 1) / T_w as every lmadapt schedule."""
    t_w, t_cd, t_a = warmup, warmup + cooldown, total - anneal_steps
    if anneal_steps and step >= t_a:
        return CONST * (MIN / CONST) ** ((step - t_a) / (total - t_a))
    if step < t_w:
        return PEAK * (step + 1) / t_w
    if step < t_cd:
        return CONST + (PEAK - CONST) * 0.5 * (1 + math.cos(math.pi * (step - t_w) / (t_cd - t_w)))
    return CONST


@pytest.mark.parametrize("anneal", [False, True])
def test_infinite_schedule_against_the_formulas(anneal):
    total, warmup, cooldown = 40, 4, 10
    got = [lr_factor(t, total=total, warmup=warmup, schedule="infinite", const_ratio=CONST, cooldown=cooldown,
                     anneal=anneal, min_ratio=MIN, decay_ratio=0.25) for t in range(total + 1)]
    want = [infinite_by_hand(t, warmup=warmup, cooldown=cooldown, total=total, anneal_steps=10 if anneal else 0)
            for t in range(total + 1)]
    assert got == pytest.approx(want, abs=1e-12)
    assert got[warmup - 1] == 1.0 and got[warmup] == 1.0  # the peak at the end of the warm-up
    assert got[warmup + cooldown] == CONST
    assert got[total] == pytest.approx(MIN if anneal else CONST, abs=1e-12)  # eta_min where annealing ends
    assert got[29] == CONST and got[30] == pytest.approx(CONST)  # the constant phase runs into the annealing


def test_inverse_sqrt_against_the_formula():
    got = [lr_factor(t, total=50, warmup=4, schedule="inverse_sqrt") for t in range(50)]
    assert got[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert got[4:] == pytest.approx([math.sqrt(4 / (t + 1)) for t in range(4, 50)])
    assert lr_factor(0, total=5, warmup=0, schedule="inverse_sqrt") == 1.0  # no warm-up: 1 / sqrt(t)
    assert lr_factor(3, total=5, warmup=0, schedule="inverse_sqrt") == 0.5


@pytest.mark.parametrize("schedule", ["infinite", "inverse_sqrt"])
def test_continuous_at_every_phase_boundary(schedule):
    """Over a long run no step differs from the one before by more than the warm-up's slope (1 / warmup): a value
    off at any boundary (cooldown end, annealing start or end) would jump by tenths of the peak."""
    total, warmup = 100_000, 1_000
    s = Schedule(name=schedule, total=total, warmup=warmup, cooldown=5_000, min_ratio=0.05, decay_ratio=0.1,
                 const_ratio=CONST, anneal=True)
    values = [s.factor(t) for t in range(total + 1)]
    assert max(abs(b - a) for a, b in itertools.pairwise(values)) <= 1 / warmup + 1e-12
    assert values[warmup - 1] == 1.0 == max(values)
    assert values[total] == pytest.approx(0.05, rel=1e-12)
    assert values[s.anneal_start] == pytest.approx(values[s.anneal_start - 1], rel=1e-3)


@pytest.mark.parametrize("schedule,fields", [
    ("constant", {}),
    ("infinite", {"cooldown_steps": 3, "const_ratio": 0.4}),
    ("inverse_sqrt", {}),
])
def test_a_longer_run_takes_the_same_learning_rates_for_the_steps_already_taken(schedule, fields):
    train = {"schedule": schedule, "warmup_steps": 2, **fields}
    six, ten = Schedule.of(train, 6), Schedule.of(train, 10)
    assert [six.factor(t) for t in range(6)] == [ten.factor(t) for t in range(6)]
    assert schedule_problem({**train, "max_steps": 6}, {**train, "max_steps": 10}) is None


@pytest.mark.parametrize("saved,now,why", [
    ({"schedule": "cosine"}, {"schedule": "cosine"}, "with schedule cosine the learning rate"),
    ({"schedule": "infinite", "cooldown_ratio": 0.2}, {"schedule": "infinite", "cooldown_ratio": 0.2},
     "cooldown_ratio x max_steps"),
    ({"schedule": "inverse_sqrt", "warmup_steps": 0, "warmup_ratio": 0.2},
     {"schedule": "inverse_sqrt", "warmup_steps": 0, "warmup_ratio": 0.2}, "warmup_ratio x max_steps"),
    ({"schedule": "infinite", "cooldown_steps": 2, "anneal": True, "min_lr_ratio": 0.1, "decay_ratio": 0.3},
     {"schedule": "infinite", "cooldown_steps": 2, "anneal": True, "min_lr_ratio": 0.1, "decay_ratio": 0.3},
     r"the run annealed its last steps \(anneal true, from step 8\)"),
])
def test_growing_max_steps_is_refused_where_a_taken_step_would_change(saved, now, why):
    base = {"warmup_steps": 2}
    problem = schedule_problem({**base, **saved, "max_steps": 10}, {**base, **now, "max_steps": 20})
    assert problem is not None and re.search(why, problem), problem


def test_annealing_may_be_switched_on_over_the_added_steps_only():
    run = {"schedule": "infinite", "warmup_steps": 2, "cooldown_steps": 3, "min_lr_ratio": 0.1, "max_steps": 10}
    assert schedule_problem(run, {**run, "max_steps": 20, "anneal": True, "decay_ratio": 0.5}) is None
    refused = schedule_problem(run, {**run, "max_steps": 20, "anneal": True, "decay_ratio": 0.6})
    assert "would start at step 9" in refused and "decay_ratio <= 0.5" in refused
    assert "only grow" in schedule_problem(run, {**run, "max_steps": 8})


def test_schedule_settings_are_checked_with_messages_that_name_the_field():
    assert TrainConfig(schedule="infinite", cooldown_steps=5).check() == []
    assert TrainConfig(schedule="inverse_sqrt", warmup_steps=10).check() == []
    problems = TrainConfig(schedule="infinite").check()
    assert len(problems) == 1 and problems[0].startswith("cooldown_steps: schedule infinite cools down")
    problems = TrainConfig(schedule="infinite", cooldown_steps=5, anneal=True).check()
    assert len(problems) == 1 and problems[0].startswith("min_lr_ratio: annealing decays exponentially")
    problems = TrainConfig(schedule="cosine", anneal=True, cooldown_steps=3, const_ratio=0.3).check()
    assert [p.split(":")[0] for p in problems] == ["anneal", "cooldown_steps, const_ratio"]
    problems = TrainConfig(schedule="infinite", const_ratio=1.5, cooldown_steps=-1).check()
    assert {p.split(":")[0] for p in problems} == {"const_ratio", "cooldown_steps"}
    # inverse_sqrt anneals from where the curve is when annealing starts: from sqrt(10 / 90001) here
    problems = TrainConfig(schedule="inverse_sqrt", warmup_steps=10, max_steps=100_000, anneal=True,
                           min_lr_ratio=0.1).check()
    assert len(problems) == 1 and "(0.0105409 x peak)" in problems[0]


def test_an_infinite_run_of_6_steps_resumed_to_10_ends_as_a_run_of_10(run_config, tmp_path):
    """fp32, one thread (as the resume tests of test_train.py): 6 steps (checkpoints at 2 and 4), then --resume with
    max_steps 10, ends bit for bit where a run started with 10 steps ends; the learning rates logged are the
    schedule's at every step."""
    def config(out, max_steps):
        cfg = {**run_config, "output_dir": str(tmp_path / out)}
        cfg["train"] = {**run_config["train"], "max_steps": max_steps, "save_every": 2, "threads": 1,
                        "precision": "fp32", "schedule": "infinite", "warmup_steps": 2, "cooldown_steps": 3,
                        "const_ratio": 0.3, "lr": 1e-2}
        return cfg

    train(config("short", 6), progress=False)
    resumed = train(config("short", 10), resume=True, progress=False)
    straight = train(config("long", 10), progress=False)
    a = load_file(str(resumed.adapter_dir / "adapter_model.safetensors"))
    b = load_file(str(straight.adapter_dir / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    lrs = [r["lr"] for r in resumed.loop.history if "loss" in r]
    ten = Schedule.of(config("x", 10)["train"], 10)
    assert lrs == pytest.approx([1e-2 * ten.factor(t) for t in range(4, 10)], rel=1e-6)  # from the step-4 checkpoint
    assert ten.factor(9) == 0.3
