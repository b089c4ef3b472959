"""Distillation losses against float64 hand computations on tiny tensors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from distil.training.losses import (
    IGNORE_INDEX,
    cross_entropy,
    hidden_layer_pairs,
    hidden_mse,
    kl_divergence,
    supervised_teacher_layers,
)

pytestmark = pytest.mark.unit  # no model, no audio synthesis: `make test-unit`

B, T, V = 2, 4, 7


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    student = torch.randn(B, T, V, generator=g) * 3
    teacher = torch.randn(B, T, V, generator=g) * 3
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, 0] = IGNORE_INDEX  # a masked prompt position
    labels[1, 2:] = IGNORE_INDEX  # padding
    return student, teacher, labels


def _log_softmax64(z: np.ndarray) -> np.ndarray:
    z = z - z.max()
    return z - np.log(np.exp(z).sum())


def manual_kl(student, teacher, labels, temperature) -> float:
    total, n = 0.0, 0
    for b in range(labels.shape[0]):
        for t in range(labels.shape[1]):
            if labels[b, t] == IGNORE_INDEX:
                continue
            log_ps = _log_softmax64(student[b, t].double().numpy() / temperature)
            log_pt = _log_softmax64(teacher[b, t].double().numpy() / temperature)
            total += float((np.exp(log_pt) * (log_pt - log_ps)).sum())
            n += 1
    return temperature**2 * total / n


def manual_ce(student, labels) -> float:
    losses = [
        -_log_softmax64(student[b, t].double().numpy())[labels[b, t]]
        for b in range(labels.shape[0])
        for t in range(labels.shape[1])
        if labels[b, t] != IGNORE_INDEX
    ]
    return float(np.mean(losses))


def test_kl_of_a_distribution_with_itself_is_zero(batch):
    student, _, labels = batch
    for temperature in (0.5, 1.0, 2.0, 5.0):
        assert kl_divergence(student, student.clone(), labels, temperature).abs().item() < 1e-6


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
def test_kl_matches_float64_hand_computation(batch, temperature):
    student, teacher, labels = batch
    got = kl_divergence(student, teacher, labels, temperature).item()
    assert got == pytest.approx(manual_kl(student, teacher, labels, temperature), rel=1e-5)
    assert got > 0


def test_kl_temperature_squared_factor():
    """One position in closed form: student uniform over 2 tokens, teacher logits [ln 3, 0]."""
    student = torch.zeros(1, 1, 2)
    teacher = torch.tensor([[[np.log(3.0), 0.0]]])
    labels = torch.zeros(1, 1, dtype=torch.long)
    # T = 1: p_T = [3/4, 1/4] against [1/2, 1/2].
    expected1 = 0.75 * np.log(0.75 / 0.5) + 0.25 * np.log(0.25 / 0.5)
    assert kl_divergence(student, teacher, labels, 1.0).item() == pytest.approx(expected1, rel=1e-6)
    # T = 2: p_T = softmax([ln 3 / 2, 0]) = [sqrt3, 1] / (sqrt3 + 1), and the KL is multiplied by 4.
    p = np.array([np.sqrt(3.0), 1.0]) / (np.sqrt(3.0) + 1)
    expected2 = 4 * float((p * np.log(p / 0.5)).sum())
    assert kl_divergence(student, teacher, labels, 2.0).item() == pytest.approx(expected2, rel=1e-6)


def test_masked_positions_do_not_count(batch):
    student, teacher, labels = batch
    mask = labels == IGNORE_INDEX
    s2, t2 = student.clone(), teacher.clone()
    s2[mask] = torch.randn(int(mask.sum()), V) * 50
    t2[mask] = torch.randn(int(mask.sum()), V) * 50
    assert kl_divergence(s2, t2, labels).item() == pytest.approx(
        kl_divergence(student, teacher, labels).item()
    )
    assert cross_entropy(s2, labels).item() == pytest.approx(cross_entropy(student, labels).item())


def test_cross_entropy_matches_hand_computation(batch):
    student, _, labels = batch
    assert cross_entropy(student, labels).item() == pytest.approx(manual_ce(student, labels), rel=1e-5)


def test_bf16_logits_are_reduced_in_float32(batch):
    student, teacher, labels = batch
    s16, t16 = student.bfloat16().requires_grad_(), teacher.bfloat16()
    kl = kl_divergence(s16, t16, labels)
    ce = cross_entropy(s16, labels)
    assert kl.dtype == torch.float32 and ce.dtype == torch.float32
    # Same numbers as an fp32 computation on the bf16-rounded values.
    assert kl.item() == pytest.approx(manual_kl(s16.detach().float(), t16.float(), labels, 2.0), rel=1e-5)
    (kl + ce).backward()
    assert s16.grad is not None and s16.grad.dtype == torch.bfloat16


def test_gradients_flow_to_the_student_only(batch):
    student, teacher, labels = batch
    student.requires_grad_()
    teacher.requires_grad_()
    kl_divergence(student, teacher, labels).backward()
    assert student.grad is not None and student.grad[labels != IGNORE_INDEX].abs().sum() > 0
    assert student.grad[labels == IGNORE_INDEX].abs().sum() == 0
    assert teacher.grad is None


def _plain_kl(student, teacher, labels, temperature):
    """The textbook computation, differentiated by autograd (what the fused KL must equal)."""
    keep = labels != IGNORE_INDEX
    log_ps = torch.log_softmax(student[keep] / temperature, -1)
    log_pt = torch.log_softmax(teacher[keep] / temperature, -1)
    p_t = log_pt.exp()
    kl = torch.where(p_t > 0, p_t * (log_pt - log_ps), torch.zeros_like(p_t)).sum()
    return kl * temperature**2 / keep.sum()


@pytest.mark.parametrize("all_positions", [False, True])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_kl_value_and_gradient_equal_the_textbook_computation(batch, all_positions, temperature):
    student, teacher, labels = batch
    student, teacher = student.double(), teacher.double()
    teacher[0, 1, 3] = float("-inf")  # a suppressed token: p = 0, no nan
    if all_positions:  # the distiller's case: logits at label positions only, nothing masked
        labels = labels.clamp(min=0)
    grads = []
    for fn in (kl_divergence, _plain_kl):
        s = student.clone().float().requires_grad_()
        value = fn(s, teacher.float(), labels, temperature)
        value.backward()
        grads.append((value.item(), s.grad))
    (fused, fused_grad), (plain, plain_grad) = grads
    assert fused == pytest.approx(plain, rel=1e-5)
    assert torch.isfinite(fused_grad).all()
    torch.testing.assert_close(fused_grad, plain_grad, rtol=1e-5, atol=1e-7)


def test_kl_keeps_float32_precision_over_a_whole_vocabulary():
    """Whisper's 51,864 classes over a few hundred tokens: a sum over millions of fp32 terms, in row chunks
    on a CPU (256 rows is several chunks and a remainder)."""
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(2, 256, 51864, generator=g) * 4
    labels = torch.zeros(256, dtype=torch.long)[None]
    s64 = student.double().requires_grad_()
    truth = _plain_kl(s64, teacher.double(), labels[0], 2.0)
    truth.backward()
    s = student.clone().requires_grad_()
    kl = kl_divergence(s[None], teacher[None], labels)
    kl.backward()
    assert kl.item() == pytest.approx(truth.item(), rel=1e-5)
    torch.testing.assert_close(s.grad.double(), s64.grad, rtol=1e-4, atol=1e-10)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # as under trainer.precision=bf16-mixed
        assert kl_divergence(student[None], teacher[None], labels).item() == pytest.approx(
            truth.item(), rel=1e-5
        )


def test_all_masked_gives_zero_with_a_graph(batch):
    student, teacher, labels = batch
    student.requires_grad_()
    labels = torch.full_like(labels, IGNORE_INDEX)
    kl, ce = kl_divergence(student, teacher, labels), cross_entropy(student, labels)
    assert kl.item() == 0 and ce.item() == 0
    (kl + ce).backward()
    assert torch.equal(student.grad, torch.zeros_like(student))


def test_shape_and_argument_errors(batch):
    student, teacher, labels = batch
    with pytest.raises(ValueError, match="differ"):
        kl_divergence(student, teacher[:, :, :-1], labels)
    with pytest.raises(ValueError, match="line up"):
        cross_entropy(student, labels[:, :-1])
    with pytest.raises(ValueError, match="temperature"):
        kl_divergence(student, teacher, labels, 0.0)


def test_student_layers_emulate_the_last_teacher_layer_of_their_block():
    # The reference's get_layers_to_supervise, on its own docstring's examples.
    assert supervised_teacher_layers(2, 32) == [15, 31]
    assert supervised_teacher_layers(3, 12) == [3, 7, 11]
    assert supervised_teacher_layers(4, 4) == [0, 1, 2, 3]  # an identical copy pairs layer i with i
    assert supervised_teacher_layers(2, 4) == [1, 3]  # not the copied layers [0, 3]
    assert hidden_layer_pairs(2, 32) == [(0, 0), (1, 16), (2, 32)]  # index 0: the embeddings
    with pytest.raises(ValueError, match="cannot emulate"):
        supervised_teacher_layers(5, 4)


def test_hidden_mse_matches_hand_computation():
    g = torch.Generator().manual_seed(1)
    student = [torch.randn(2, 3, 5, generator=g) for _ in range(3)]  # embeddings + 2 layers
    teacher = [torch.randn(2, 3, 5, generator=g) for _ in range(7)]  # embeddings + 6 layers
    pairs = hidden_layer_pairs(2, 6)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])

    def manual(use_mask):
        per_pair = []
        for s, t in pairs:
            a, b = student[s].double().numpy(), teacher[t].double().numpy()
            if use_mask:
                keep = mask.numpy().astype(bool)
                a, b = a[keep], b[keep]
            per_pair.append(((a - b) ** 2).mean())
        return float(np.sum(per_pair))  # summed, as the reference

    assert hidden_mse(student, teacher, pairs).item() == pytest.approx(manual(False), rel=1e-5)
    assert hidden_mse(student, teacher, pairs, mask).item() == pytest.approx(manual(True), rel=1e-5)
    assert hidden_mse(teacher, teacher, [(i, i) for i in range(7)]).item() == 0
    with pytest.raises(IndexError, match="teacher"):
        hidden_mse(student, teacher, [(0, 7)])


def _step(student, teacher, labels, hidden_terms=()):
    from distil.training.loss_terms import StepOutputs

    return StepOutputs(student, labels, labels, torch.zeros(1), teacher, list(hidden_terms))


def test_loss_terms_equal_hand_computation(batch):
    from distil.training.loss_terms import CrossEntropy, ForwardKL, HiddenStateMSE

    student, teacher, labels = batch
    g = torch.Generator().manual_seed(2)
    s_hidden = [torch.randn(B, T, 3, generator=g) for _ in range(3)]
    t_hidden = [torch.randn(B, T, 3, generator=g) for _ in range(5)]
    enc_s = [torch.randn(B, 6, 3, generator=g) for _ in range(2)]
    enc_t = [torch.randn(B, 6, 3, generator=g) for _ in range(2)]
    hidden_terms = [
        (enc_s, enc_t, [(0, 0), (1, 1)], None),
        (s_hidden, t_hidden, hidden_layer_pairs(2, 4), labels != IGNORE_INDEX),
    ]
    step = _step(student, teacher, labels, hidden_terms)
    assert CrossEntropy(0.8)(step).item() == pytest.approx(manual_ce(student, labels), rel=1e-5)
    kl = ForwardKL(1.0, temperature=2.0)(step).item()
    assert kl == pytest.approx(manual_kl(student, teacher, labels, 2.0), rel=1e-5)
    # The reference's scale: the per-pair terms summed over both stacks, divided by the label-token count.
    n_tokens = int((labels != IGNORE_INDEX).sum())
    mse = (hidden_mse(*hidden_terms[0]).item() + hidden_mse(*hidden_terms[1]).item()) / n_tokens
    assert HiddenStateMSE(0.3)(step).item() == pytest.approx(mse, rel=1e-5)


def test_loss_terms_are_built_from_configs_and_need_what_they_say():
    from distil.training.loss_terms import build_terms, term_config
    from distil.training.teacher import DistillationSetupError

    kd = {
        "ce": {"_target_": "distil.training.loss_terms.CrossEntropy", "weight": 0.8},
        "kl": {"_target_": "distil.training.loss_terms.ForwardKL", "weight": 0.0, "temperature": 2.0},
        "mse": {"_target_": "distil.training.loss_terms.HiddenStateMSE", "weight": 0.3},
    }
    terms = build_terms(kd)
    assert list(terms) == ["ce", "mse"]  # a zero weight leaves its term (and what it needs) out
    assert not terms["ce"].needs_teacher and terms["mse"].needs_teacher and terms["mse"].needs_hidden_states
    assert term_config(terms["mse"]) == kd["mse"]  # what checkpoints record rebuilds the term
    with pytest.raises(DistillationSetupError, match="no term with a non-zero weight"):
        build_terms({"ce": {**kd["ce"], "weight": 0}})
    with pytest.raises(DistillationSetupError, match="temperature must be > 0"):
        build_terms({"kl": {**kd["kl"], "weight": 1.0, "temperature": 0}})
    with pytest.raises(DistillationSetupError, match="loss.terms.x builds a dict"):
        build_terms({"x": {"_target_": "builtins.dict", "weight": 1}})
