"""Learning-rate schedules as parts (issue 35): each formula in one pure function (distil.training.optim), the
rate each optimiser step applied logged as `optim/lr`, and a resume that computes its rates from its own config."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from test_train import compose_train, home, models_root  # noqa: F401  (fixtures)

from distil.training.optim import SCHEDULES, build_scheduler, lr_lambda, wsd_decay_start


@pytest.mark.unit
def test_each_schedule_is_its_formula():
    warm, total = 2, 12
    # warm-up: (step + 1) / warmup_steps, whatever the schedule
    assert all(lr_lambda(s, warm, total, name) == (s + 1) / warm for name in SCHEDULES for s in (0, 1))
    assert [lr_lambda(s, warm, total, "constant") for s in (2, 7, 11)] == [1.0, 1.0, 1.0]
    assert [lr_lambda(s, warm, total, "linear") for s in (2, 7, 12)] == [1.0, 0.5, 0.0]
    for s in (2, 5, 7, 11, 12):  # min + (1 - min) * (1 + cos(pi * progress)) / 2
        progress = (s - warm) / (total - warm)
        for ratio in (0.0, 0.1):
            expected = ratio + (1 - ratio) * 0.5 * (1 + math.cos(math.pi * progress))
            assert lr_lambda(s, warm, total, "cosine", min_lr_ratio=ratio) == pytest.approx(expected)
    assert lr_lambda(7, warm, total, "cosine") == pytest.approx(0.5)
    assert lr_lambda(12, warm, total, "linear", min_lr_ratio=0.2) == pytest.approx(0.2)
    # wsd: decay over the last round(0.25 * 12) = 3 steps (9, 10, 11), linear to 0 at 12
    assert wsd_decay_start(warm, total, 0.25) == 9
    assert [
        lr_lambda(s, warm, total, "wsd", decay_fraction=0.25) for s in (2, 8, 9, 10, 11, 12)
    ] == pytest.approx([1.0, 1.0, 1.0, 2 / 3, 1 / 3, 0.0])
    assert lr_lambda(11, warm, total, "wsd", min_lr_ratio=0.1, decay_fraction=0.25) == pytest.approx(
        0.1 + 0.9 / 3
    )
    # the ends of decay_fraction: 0 is constant, 1 is linear (the decay never eats warm-up)
    for s in range(total + 1):
        assert lr_lambda(s, warm, total, "wsd", decay_fraction=0.0) == lr_lambda(s, warm, total, "constant")
        assert lr_lambda(s, warm, total, "wsd", decay_fraction=1.0) == lr_lambda(s, warm, total, "linear")


@pytest.mark.unit
def test_build_scheduler_applies_the_formula_and_refuses_bad_input():
    from distil.utils.errors import ConfigError

    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=1.0)
    scheduler = build_scheduler(optimizer, 1, 6, "cosine", min_lr_ratio=0.1)
    seen = []
    for _ in range(6):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert seen == pytest.approx([lr_lambda(s, 1, 6, "cosine", 0.1) for s in range(6)])
    assert scheduler.state_dict()["lr_lambdas"] == [None]  # a closure: a resume takes its config's formula
    with pytest.raises(
        ConfigError, match=r"optim.schedule must be one of \['constant', 'linear', 'cosine', 'wsd'\]"
    ):
        build_scheduler(optimizer, 1, 6, "exponential")
    with pytest.raises(ConfigError, match="trainer.max_steps > 0"):
        build_scheduler(optimizer, 1, 0, "wsd")


@pytest.mark.unit
def test_a_run_recorded_before_the_schedule_keys_resumes_and_other_values_are_refused(tmp_path):
    from distil.train import RUN_CONFIG, ResumeSettingsChangedError, check_run_config
    from distil.utils.io import write_json_atomic

    write_json_atomic(
        tmp_path / RUN_CONFIG, {"optim.lr": 1e-4, "optim.schedule": "linear"}
    )  # an older record
    now = {
        "optim.lr": 1e-4,
        "optim.schedule": "linear",
        "optim.min_lr_ratio": 0.0,
        "optim.decay_fraction": 0.1,
    }
    assert check_run_config(tmp_path, now, resuming=True, force=False) == []
    with pytest.raises(ResumeSettingsChangedError, match=r"optim\.min_lr_ratio 0\.0 → 0\.1"):
        check_run_config(tmp_path, {**now, "optim.min_lr_ratio": 0.1}, resuming=True, force=False)


def logged_lr(out_dir: Path) -> dict[int, float]:
    """`optim/lr` by step from every TensorBoard file of a run (a resume appends a file; the later one wins)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    rates: dict[int, float] = {}
    for events in sorted(
        (out_dir / "tensorboard").glob("events.out.tfevents.*"), key=lambda p: p.stat().st_mtime
    ):
        acc = EventAccumulator(str(events))
        acc.Reload()
        if "optim/lr" in acc.Tags()["scalars"]:
            rates.update({e.step: e.value for e in acc.Scalars("optim/lr")})
    return rates


@pytest.mark.slow  # two training runs (~7 s)
def test_the_logged_rate_of_each_step_is_the_formula_also_after_a_resume_with_more_steps(home, tmp_path):  # noqa: F811
    """cosine with a floor: 4 steps, then the same run resumed to 8 (trainer.max_steps may change on resume):
    every step's logged rate is optim.lr * lr_lambda(step) of the config in force, from the first resumed step."""
    from distil.train import train

    run = [
        "out_dir=" + str(tmp_path / "run"),
        "export=false",
        "optim.schedule=cosine",
        "optim.min_lr_ratio=0.1",
    ]
    cfg = compose_train(home, [*run, "optim.warmup_steps=2"], steps=4)
    train(cfg)
    assert logged_lr(tmp_path / "run") == pytest.approx(
        {s: 1e-4 * lr_lambda(s, 2, 4, "cosine", 0.1) for s in range(4)}, rel=1e-6
    )
    train(compose_train(home, [*run, "optim.warmup_steps=2"], steps=8))
    rates = logged_lr(tmp_path / "run")
    assert sorted(rates) == list(range(8))
    for s in range(4, 8):
        assert rates[s] == pytest.approx(1e-4 * lr_lambda(s, 2, 8, "cosine", 0.1), rel=1e-6), s


def test_wsd_logged_rates_are_the_formula_and_recorded(home, tmp_path):  # noqa: F811
    from distil.train import run_config, train

    cfg = compose_train(
        home,
        [
            "out_dir=" + str(tmp_path / "wsd"),
            "export=false",
            "optim.schedule=wsd",
            "optim.decay_fraction=0.5",
        ],
        steps=6,
    )
    assert run_config(cfg)["optim.decay_fraction"] == 0.5
    train(cfg)
    assert logged_lr(tmp_path / "wsd") == pytest.approx(
        {s: 1e-4 * lr_lambda(s, 1, 6, "wsd", decay_fraction=0.5) for s in range(6)}, rel=1e-6
    )
