"""The encoder CTC loss term (loss=kd_ctc): its value, its refusal with a frozen encoder, and a real training run
of a student whose encoder trains, logging the term."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import cli, entry, write_split

from distil.training.ctc import ALPHABET, EncoderCTC, characters
from distil.training.loss_terms import StepOutputs
from distil.training.teacher import DistillationSetupError


class _Tokenizer:
    def batch_decode(self, ids, skip_special_tokens=True):
        return ["".join(chr(i) for i in row) for row in ids]


class _Distiller:
    freeze_encoder = False

    class student:  # noqa: N801 - stands in for the student's config
        class config:  # noqa: N801
            d_model = 8


def test_ctc_is_the_character_ctc_of_a_linear_head_on_the_encoder_output():
    assert characters("It's  Ten, 10!") == [ALPHABET.index(c) + 1 for c in "it's ten 10"]
    term = EncoderCTC(weight=0.3)
    term.setup(_Distiller())
    torch.manual_seed(0)
    encoder_output = torch.randn(2, 50, 8, requires_grad=True)
    label_ids = torch.tensor([[-100, ord("a"), ord("b")], [ord("c"), -100, -100]])  # -100: prompt, padding
    step = StepOutputs(torch.zeros(1), label_ids, label_ids, encoder_output, load_tokenizer=_Tokenizer)
    value = term(step)
    log_probs = term.head(encoder_output).log_softmax(-1).transpose(0, 1)
    by_hand = F.ctc_loss(log_probs, torch.tensor([2, 3, 4]), torch.tensor([50, 50]), torch.tensor([2, 1]))
    assert value.item() == pytest.approx(by_hand.item(), rel=1e-6)
    value.backward()
    assert encoder_output.grad.abs().sum() > 0 and term.head.weight.grad is not None


def test_ctc_refuses_a_frozen_encoder():
    frozen = _Distiller()
    frozen.freeze_encoder = True
    with pytest.raises(
        DistillationSetupError, match="loss term ctc trains the student's encoder, which is frozen"
    ):
        EncoderCTC(weight=0.3).setup(frozen)


def test_kd_ctc_trains_a_student_whose_encoder_trains_and_logs_the_term(tmp_path, tiny_random_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from transformers import WhisperTokenizerFast

    (tmp_path / "models").mkdir()
    for name in ("whisper-tiny-random", "whisper-tiny.en"):  # the random teacher borrows tiny.en's processor
        (tmp_path / "models" / name).symlink_to(Path(tiny_random_dir).parent / name)
    tok = WhisperTokenizerFast.from_pretrained(tiny_random_dir)
    write_split(tmp_path / "pseudo_labels" / "whisper-tiny-random", "a", "train", 6, tok)
    write_split(tmp_path / "corpora", "a", "train", 6, labelled=False)
    a = entry("a", tmp_path / "corpora")
    out = tmp_path / "run"
    # A shrunk encoder (1 of the tiny teacher's 2 layers): freeze_encoder=auto lets it train.
    overrides = ["teacher=tiny_random", "student=enc2_dec2", "student.encoder_layers=1", "loss=kd_ctc"]
    overrides += ["trainer=debug", "trainer.max_steps=2"]
    overrides += [f"out_dir={out}", "data=custom", "data.batch_size=2", "trainer.limit_val_batches=0"]
    overrides += [f"data.datasets.0.{k}={v}" for k, v in a.items() if k != "splits"]
    cli("train", *overrides, home=tmp_path)
    events = EventAccumulator(str(next(out.rglob("events.out.tfevents.*")).parent))
    events.Reload()
    assert "train/ctc" in events.Tags()["scalars"] and "train/kl" in events.Tags()["scalars"]
    assert all(torch.isfinite(torch.tensor(e.value)) for e in events.Scalars("train/ctc"))

    frozen = cli(
        "train",
        *overrides,
        "model.freeze_encoder=true",
        f"out_dir={tmp_path / 'frozen'}",
        home=tmp_path,
        check=False,
    )
    assert frozen.returncode != 0 and "loss term ctc trains the student's encoder" in frozen.stderr
    assert "Traceback" not in frozen.stderr
