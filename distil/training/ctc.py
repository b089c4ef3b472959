"""An optional CTC loss on the student encoder's output (Distil-Whisper's seed 004: `λ·L_KD + (1-λ)·L_CTC`).

The paper's students keep the teacher's encoder frozen and have no CTC term; this one is for students whose
encoder trains (`student=enc2_dec2`, or `model.freeze_encoder=false`): a linear head over the encoder's 1,500
frames predicts the label's characters (a-z, digits, apostrophe, space; blank = 0), which pulls the encoder to
keep what the words need on its own, independently of the decoder. The head trains with the student, is
checkpointed with it and is not part of the exported student. `loss=kd_ctc` adds it to KD.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

from distil.training.loss_terms import LossTerm, StepOutputs
from distil.training.losses import IGNORE_INDEX
from distil.training.teacher import DistillationSetupError

ALPHABET = " abcdefghijklmnopqrstuvwxyz'0123456789"  # class i + 1; 0 is the CTC blank


def characters(text: str) -> list[int]:
    """The CTC target of a transcript: lower-case, other characters dropped, runs of spaces as one."""
    text = re.sub(r"\s+", " ", text.lower()).strip()
    return [ALPHABET.index(c) + 1 for c in text if c in ALPHABET]


class EncoderCTC(LossTerm):
    """Character CTC of a linear head on the student encoder's output, averaged over the batch (each sample's
    loss divided by its target length, as `F.ctc_loss(reduction="mean")`)."""

    def setup(self, distiller) -> None:
        if distiller.freeze_encoder:
            raise DistillationSetupError(
                "loss term ctc trains the student's encoder, which is frozen here: use a student whose encoder "
                "trains (student=enc2_dec2, or model.freeze_encoder=false)"
            )
        self.head = nn.Linear(distiller.student.config.d_model, len(ALPHABET) + 1)

    def forward(self, step: StepOutputs) -> torch.Tensor:
        ids = [[t for t in row if t != IGNORE_INDEX] for row in step.label_ids.tolist()]  # the prompt is -100
        texts = step.tokenizer.batch_decode(ids, skip_special_tokens=True)
        targets = [characters(t) for t in texts]
        log_probs = (
            self.head(step.encoder_output).float().log_softmax(-1).transpose(0, 1)
        )  # [frames, batch, C]
        frames, batch = log_probs.shape[:2]
        return F.ctc_loss(
            log_probs,
            torch.tensor([c for t in targets for c in t], dtype=torch.long),
            torch.full((batch,), frames, dtype=torch.long),
            torch.tensor([len(t) for t in targets], dtype=torch.long),
            blank=0,
            reduction="mean",
            zero_infinity=True,
        )
