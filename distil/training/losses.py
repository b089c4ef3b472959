"""Distillation losses, the maths: CE on (pseudo-)labels, temperature-scaled KL to the teacher, hidden-state MSE.

Pure functions of tensors; the loss terms that weight and combine them are distil.training.loss_terms
(Distil-Whisper's recipe: 0.8 CE + 1.0 KL at temperature 2.0, conf/loss/kd.yaml).

Logits are `[batch, time, vocab]` aligned with `labels` `[batch, time]` (logit `t` predicts label `t`;
see distil.data.targets), and positions whose label is -100 (padding, prompt) are excluded everywhere.
The vocabulary is large (51k), so the masked positions are selected first and only those rows are
upcast to float32: no extra full `[B, T, V]` copy is made, and bf16 logits are reduced in fp32.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from distil.utils.errors import ConfigError

IGNORE_INDEX = -100
DEFAULT_TEMPERATURE = 2.0


def _select(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of `logits` (as float32) and their labels at the positions that count (label != -100)."""
    if logits.shape[:-1] != labels.shape:
        raise ValueError(
            f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} do not line up: expected "
            "logits [batch, time, vocab] with labels [batch, time]"
        )
    mask = labels != IGNORE_INDEX
    if bool(mask.all()):  # the distiller passes label positions only: no [N, V] copy (nor its backward)
        return logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1)
    return logits[mask].float(), labels[mask]


def _zero(like: torch.Tensor) -> torch.Tensor:
    # Keeps the graph connected (DDP expects every parameter to get a gradient) when nothing counts.
    return like.sum() * 0.0


def cross_entropy(student_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean token cross-entropy over positions whose label is not -100 (0 if there are none)."""
    logits, targets = _select(student_logits, labels)
    if targets.numel() == 0:
        return _zero(student_logits).float()
    return F.cross_entropy(logits, targets, reduction="mean")


def kl_divergence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    temperature: float = DEFAULT_TEMPERATURE,
) -> torch.Tensor:
    """`T^2 * sum_t sum_v p_T(v) (log p_T(v) - log p_S(v)) / n_tokens` with `p = softmax(z / T)`.

    Summed over the vocabulary, averaged over the positions whose label is not -100. The `T^2`
    factor keeps gradient magnitudes comparable across temperatures (Hinton et al., 2015).
    """
    if temperature <= 0:
        raise ConfigError(f"temperature must be positive, got {temperature}")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} differ; they must share batch, time and vocabulary"
        )
    s, _ = _select(student_logits, labels)
    t, _ = _select(teacher_logits.detach(), labels)
    n_tokens = s.shape[0]
    if n_tokens == 0:
        return _zero(student_logits).float()
    return _TemperedKL.apply(s, t, float(temperature)) * (temperature**2) / n_tokens


# Rows of [rows, V] fp32 per chunk on a CPU: ~4 MB per temporary, so a chunk's passes stay in cache.
CPU_CHUNK_ELEMENTS = 2**20


class _TemperedKL(torch.autograd.Function):
    """`sum_rows KL(softmax(t / T) || softmax(s / T))` for `[N, V]` logits, gradient to `s` only.

    The same value as `F.kl_div(log_softmax(s / T), log_softmax(t / T), log_target=True, reduction="sum")`,
    in fewer passes over memory (51,864 columns: on a CPU the passes, not the arithmetic, are the cost): the
    gradient `(softmax(s / T) - p_T) / T` is formed in the forward pass, the sum is a dot product per row
    instead of elementwise temporaries, and on a CPU rows go in chunks small enough to stay in cache (on a
    GPU one chunk: launches would cost more than the passes).
    """

    @staticmethod
    def forward(ctx, student, teacher, temperature):
        n, vocab = student.shape
        rows = max(1, CPU_CHUNK_ELEMENTS // vocab) if student.device.type == "cpu" else n
        grad = torch.empty_like(student)
        kl = student.new_zeros(())
        # Under bf16-mixed autocast bmm would run in bf16: the loss is reduced in fp32, as the inputs are.
        with torch.autocast(student.device.type, enabled=False):
            for i in range(0, n, rows):
                log_p_s = torch.log_softmax(student[i : i + rows] / temperature, dim=-1)
                log_ratio = torch.log_softmax(teacher[i : i + rows] / temperature, dim=-1)
                # A teacher logit of -inf (suppressed token) gives p = 0; clamping avoids 0 * inf = nan.
                log_ratio.clamp_(min=torch.finfo(log_ratio.dtype).min)
                p_t = log_ratio.exp()
                log_ratio -= log_p_s  # log(p_T / p_S)
                # One dot product per row (a single one over all N * V terms would lose fp32 precision).
                kl += torch.bmm(p_t.unsqueeze(1), log_ratio.unsqueeze(2)).sum()
                torch.sub(log_p_s.exp_(), p_t, out=grad[i : i + rows])  # d KL / d(s / T)
        ctx.temperature = temperature
        ctx.save_for_backward(grad)
        return kl

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_kl):
        (grad,) = ctx.saved_tensors
        return grad * (grad_kl / ctx.temperature), None, None


def supervised_teacher_layers(n_student: int, n_teacher: int) -> list[int]:
    """The teacher layer whose output student layer `i` learns to emulate, for the hidden-state MSE.

    The reference's `get_layers_to_supervise`: the *last* teacher layer of each equal block,
    `linspace(T//S - 1, T - 1, S)` with the last forced to `T - 1` (12 -> 3: [3, 7, 11]; 32 -> 2: [15, 31]),
    so student layer `i` behaves like the first blocks of the teacher. This is not the layer the student
    was copied from (that pairing would only pull each layer to stay a copy).
    """
    if not 1 <= n_student <= n_teacher:
        raise ConfigError(f"a student with {n_student} layers cannot emulate a {n_teacher}-layer teacher")
    layers = np.linspace(n_teacher // n_student - 1, n_teacher - 1, n_student, dtype=int)
    layers[-1] = n_teacher - 1
    return [int(t) for t in layers]


def hidden_layer_pairs(n_student: int, n_teacher: int) -> list[tuple[int, int]]:
    """(student, teacher) indices into `output_hidden_states` tuples (index 0 = the embedding output).

    The embeddings are paired with each other and student layer `i` with `supervised_teacher_layers[i]`.
    """
    return [(0, 0)] + [(i + 1, t + 1) for i, t in enumerate(supervised_teacher_layers(n_student, n_teacher))]


def hidden_mse(
    student_hidden: Sequence[torch.Tensor],
    teacher_hidden: Sequence[torch.Tensor],
    layer_pairs: Sequence[tuple[int, int]],
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sum over `layer_pairs` of the MSE between student and teacher hidden states `[B, T, D]`.

    As the reference: each pair's term is the mean over positions and the hidden dimension, and the
    terms are summed (`HiddenStateMSE` then divides by the label-token count). `mask` `[B, T]`
    (bool or 0/1) restricts the positions: the decoder's padding is left out (the reference includes it).
    """
    if not layer_pairs:
        raise ValueError("hidden_mse needs at least one (student, teacher) layer pair")
    keep = None if mask is None else mask.bool()
    total = None
    for s_idx, t_idx in layer_pairs:
        if not (-len(student_hidden) <= s_idx < len(student_hidden)):
            raise IndexError(
                f"student hidden-state index {s_idx} out of range ({len(student_hidden)} states)"
            )
        if not (-len(teacher_hidden) <= t_idx < len(teacher_hidden)):
            raise IndexError(
                f"teacher hidden-state index {t_idx} out of range ({len(teacher_hidden)} states)"
            )
        s, t = student_hidden[s_idx], teacher_hidden[t_idx].detach()
        if s.shape != t.shape:
            raise ValueError(
                f"hidden states of student {s_idx} {tuple(s.shape)} and teacher {t_idx} {tuple(t.shape)} differ"
            )
        if keep is not None:
            s, t = s[keep], t[keep]
        term = _zero(s).float() if s.numel() == 0 else F.mse_loss(s.float(), t.float(), reduction="mean")
        total = term if total is None else total + term
    return total


HiddenTerm = tuple[
    Sequence[torch.Tensor], Sequence[torch.Tensor], Sequence[tuple[int, int]], torch.Tensor | None
]
