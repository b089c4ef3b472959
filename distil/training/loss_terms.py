"""The terms of the training loss as parts: each a small module with a `weight` that says what it needs.

`conf/loss/*.yaml` list the terms under `terms:` (each a `_target_` here, or in your own module); the distiller
(distil.modules.distiller) computes only what the listed terms need, loads the teacher only when one needs it,
and minimises `sum(term.weight * term(step))`, logging each term under its key. A term with weight 0 is left
out. The maths are the pure functions of distil.training.losses.

A new term: subclass `LossTerm`, set the `needs_*` flags it reads from `StepOutputs`, implement `forward`
(and `setup` to check the run or to build parameters it trains), and list it in a `conf/loss/<name>.yaml`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from distil.training.losses import IGNORE_INDEX, HiddenTerm, cross_entropy, hidden_mse, kl_divergence
from distil.training.teacher import DistillationSetupError


@dataclass
class StepOutputs:
    """What one training step computed, for the loss terms to read.

    `student_logits` and `labels` are aligned (at label positions only, unless the distiller's `full_logits`);
    `teacher_logits` is there when a term `needs_teacher_logits`, `hidden_terms` (one `(student, teacher,
    layer pairs, mask)` per stack) when a term `needs_hidden_states`. `encoder_output` is the student encoder's
    output `[batch, frames, d_model]` (with a gradient when the encoder trains); `label_ids` the batch's labels
    `[batch, time]` (-100 where nothing is predicted); `tokenizer` the student's, to read them as text (loaded on
    first use).
    """

    student_logits: torch.Tensor
    labels: torch.Tensor
    label_ids: torch.Tensor
    encoder_output: torch.Tensor
    teacher_logits: torch.Tensor | None = None
    hidden_terms: Sequence[HiddenTerm] = field(default_factory=list)
    load_tokenizer: Callable[[], Any] | None = None

    @property
    def tokenizer(self) -> Any:
        return self.load_tokenizer() if self.load_tokenizer is not None else None

    @property
    def label_tokens(self) -> int:
        return max(int((self.label_ids != IGNORE_INDEX).sum()), 1)


class LossTerm(nn.Module):
    """One weighted term of the loss. Its parameters (if any) train with the student and are checkpointed."""

    needs_teacher_logits: ClassVar[bool] = False
    needs_hidden_states: ClassVar[bool] = False

    def __init__(self, weight: float):
        super().__init__()
        self.weight = float(weight)

    @property
    def needs_teacher(self) -> bool:
        return self.needs_teacher_logits or self.needs_hidden_states

    def setup(self, distiller: Any) -> None:
        """Called once the student (and teacher) are loaded: refuse a run this term cannot work in, or build
        parameters that depend on the model's sizes."""

    def forward(self, step: StepOutputs) -> torch.Tensor:
        raise NotImplementedError


class CrossEntropy(LossTerm):
    """Mean token cross-entropy of the student on the labels (pseudo-labels or reference text)."""

    def forward(self, step: StepOutputs) -> torch.Tensor:
        return cross_entropy(step.student_logits, step.labels)


class ForwardKL(LossTerm):
    """KL(teacher || student) of the token distributions at `temperature`, times T^2 (Hinton et al., 2015)."""

    needs_teacher_logits = True

    def __init__(self, weight: float, temperature: float = 2.0):
        super().__init__(weight)
        if temperature <= 0:
            raise DistillationSetupError(f"loss temperature must be > 0, got {temperature}")
        self.temperature = float(temperature)

    def forward(self, step: StepOutputs) -> torch.Tensor:
        return kl_divergence(step.student_logits, step.teacher_logits, step.labels, self.temperature)


class HiddenStateMSE(LossTerm):
    """MSE between hidden states of mapped student/teacher layers (each student layer to the last teacher layer
    of its block, embeddings to embeddings), summed over pairs and divided by the label tokens: the reference's
    scale, so weights {0.3, 1, 3} mean what they mean in the paper. A frozen student encoder adds nothing."""

    needs_hidden_states = True

    def forward(self, step: StepOutputs) -> torch.Tensor:
        if not step.hidden_terms:
            return step.student_logits.sum() * 0.0
        return sum(hidden_mse(*term) for term in step.hidden_terms) / step.label_tokens


def build_terms(terms: dict[str, Any]) -> dict[str, LossTerm]:
    """Loss terms from their configs (`{_target_: ..., weight: ..., ...}`) or as built; weight-0 terms dropped."""
    from distil.utils.errors import instantiate

    built = {}
    for key, term in (terms or {}).items():
        if term is None:
            continue
        term = term if isinstance(term, LossTerm) else instantiate(dict(term))
        if not isinstance(term, LossTerm):
            raise DistillationSetupError(
                f"loss.terms.{key} builds a {type(term).__name__}, not a distil.training.loss_terms.LossTerm"
            )
        if term.weight != 0:
            built[key] = term
    if not built:
        raise DistillationSetupError("loss.terms has no term with a non-zero weight: nothing to train on")
    return built


def term_config(term: LossTerm) -> dict[str, Any]:
    """A built term as the config that rebuilds it (recorded in checkpoints' hyper-parameters)."""
    import inspect

    cls = type(term)
    args = {
        name: getattr(term, name) for name in inspect.signature(cls.__init__).parameters if name != "self"
    }
    return {"_target_": f"{cls.__module__}.{cls.__qualname__}", **args}
