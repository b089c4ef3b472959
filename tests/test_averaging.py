"""Checkpoint averaging and EMA (issue 35, item 4): `checkpoint.average_last=N` exports the mean of the trained
weights at the last N saves as `averaged/`, `ema.decay=d` an exponential moving average as `ema/`; `best` and
`last` keep their meaning, and a stopped-and-resumed run exports what the uninterrupted one does."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from test_train import compose_train, home, models_root  # noqa: F401  (fixtures)

from distil.training.averaging import average_weights, ema_update, trained_weights


@pytest.mark.unit
def test_average_and_ema_arithmetic():
    a = {"w": torch.tensor([1.0, 2.0]), "b": torch.tensor([0.0])}
    b = {"w": torch.tensor([3.0, 6.0]), "b": torch.tensor([1.0])}
    assert torch.equal(average_weights([a, b])["w"], torch.tensor([2.0, 4.0]))
    assert torch.equal(average_weights([a])["b"], a["b"])
    ema = {k: v.clone() for k, v in a.items()}
    ema_update(ema, b, decay=0.75, updates=1)  # 0.75 * ema + 0.25 * current
    assert torch.allclose(ema["w"], torch.tensor([1.5, 3.0])) and torch.allclose(
        ema["b"], torch.tensor([0.25])
    )


@pytest.mark.unit
def test_trained_weights_are_the_students_trainable_parameters_once_each():
    class Module(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.student = torch.nn.ModuleDict(
                {"embed": torch.nn.Embedding(3, 2), "out": torch.nn.Linear(2, 3)}
            )
            self.student["out"].weight = self.student["embed"].weight  # tied, as Whisper's proj_out
            self.student["frozen"] = torch.nn.Linear(2, 2).requires_grad_(False)
            self.other = torch.nn.Linear(2, 2)

    assert sorted(trained_weights(Module())) == ["student.embed.weight", "student.out.bias"]


@pytest.mark.unit
def test_the_saves_kept_are_the_last_n_the_final_step_counting_as_one(tmp_path):
    from types import SimpleNamespace

    from distil.training.averaging import CheckpointAverage

    trainer = SimpleNamespace(global_step=0, is_global_zero=True)
    module = torch.nn.Module()
    module.student = torch.nn.Linear(1, 1)
    keeper = CheckpointAverage(tmp_path, keep=3, every_n_steps=2)
    for step in range(1, 10):
        trainer.global_step = step
        keeper.on_train_batch_end(trainer, module, None, None, step)
    assert keeper.saved == [4, 6, 8] and sorted(p.name for p in tmp_path.iterdir()) == [
        "step-4.pt",
        "step-6.pt",
        "step-8.pt",
    ]
    keeper.on_train_end(trainer, module)  # final step 9
    assert keeper.averaged_steps() == [6, 8, 9] and not (tmp_path / "step-4.pt").exists()
    again = CheckpointAverage(tmp_path, keep=3, every_n_steps=2)  # a resume of that run, extended
    again.load_state_dict(keeper.state_dict())
    again.on_train_start(trainer, module)
    assert again.saved == [6, 8] and not (tmp_path / "step-9.pt").exists()
    trainer.global_step = 10
    again.on_train_batch_end(trainer, module, None, None, 10)
    assert again.averaged_steps() == [6, 8, 10]


class Recorder(L.Callback):
    """The student's trainable weights after every optimiser step (HF names): the ground truth."""

    def __init__(self):
        self.weights: dict[int, dict[str, torch.Tensor]] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.weights[trainer.global_step] = {
            n: p.detach().clone() for n, p in pl_module.student.named_parameters() if p.requires_grad
        }


def exported(path: Path) -> dict[str, torch.Tensor]:
    from transformers import WhisperForConditionalGeneration

    return dict(WhisperForConditionalGeneration.from_pretrained(path).named_parameters())


@pytest.mark.slow  # three short training runs with exports (~20 s)
def test_averaged_and_ema_exports_are_the_hand_computed_averages_and_resume_exactly(home, tmp_path):  # noqa: F811
    from distil.train import run_config, train

    knobs = ["checkpoint.every_n_steps=2", "checkpoint.average_last=2", "ema.decay=0.5"]
    cfg = compose_train(home, ["out_dir=" + str(tmp_path / "straight"), *knobs], steps=5)
    assert run_config(cfg)["ema.decay"] == 0.5 and run_config(cfg)["checkpoint.average_last"] == 2
    recorder = Recorder()
    summary = train(cfg, callbacks=[recorder])
    out = Path(cfg.out_dir)
    assert {"best", "last", "averaged", "ema"} <= set(summary["exports"])
    w = recorder.weights
    assert sorted(w) == [1, 2, 3, 4, 5]
    # saves at steps 2, 4 and the final 5: the last two averaged
    assert sorted(p.name for p in (out / "checkpoints" / "averaged").iterdir()) == ["step-4.pt", "step-5.pt"]
    ema = dict(w[1])
    for step in (2, 3, 4, 5):
        ema = {k: 0.5 * ema[k] + 0.5 * w[step][k] for k in ema}
    averaged, smoothed, last = exported(out / "averaged"), exported(out / "ema"), exported(out / "last")
    for key in w[5]:
        torch.testing.assert_close(averaged[key], (w[4][key] + w[5][key]) / 2, msg=key)
        torch.testing.assert_close(smoothed[key], ema[key], msg=key)
        torch.testing.assert_close(last[key], w[5][key], rtol=0, atol=0, msg=key)  # last is still the weights
    assert any(not torch.equal(averaged[k], last[k]) for k in w[5])

    # Stopped after 3 steps (its final step 3 saved), then the same command with the full max_steps.
    resumed = ["out_dir=" + str(tmp_path / "resumed"), *knobs]
    train(compose_train(home, resumed, steps=3))
    assert (tmp_path / "resumed" / "checkpoints" / "averaged" / "step-3.pt").is_file()
    summary = train(compose_train(home, resumed, steps=5))
    assert summary["resumed_from"]
    names = sorted(p.name for p in (tmp_path / "resumed" / "checkpoints" / "averaged").iterdir())
    assert names == ["step-4.pt", "step-5.pt"]  # step 3 was the shorter run's end, not a save of the cadence
    for name in ("averaged", "ema", "last"):
        again = exported(tmp_path / "resumed" / name)
        for key in w[5]:
            torch.testing.assert_close(
                again[key], exported(out / name)[key], rtol=1e-5, atol=1e-6, msg=(name, key)
            )
