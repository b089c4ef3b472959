"""The KD loss (0.8 CE + KL at T = 2) on a training step's logits, forward + backward, side by side.

    python benchmarks/kd_loss.py                          # 8 packed segments x 130 label tokens, 51,864 classes
    python benchmarks/kd_loss.py --tokens 2000 --repeats 9

Two implementations of the same loss, over the same `[tokens, vocab]` logits (the distiller projects label
positions only, so nothing is masked):

  textbook   boolean-index copies of the logits, `log_softmax` of both, `F.kl_div(log_target=True)` and
             autograd's backward through all of it (distil's loss before the fused KL)
  distil     `distil.training.losses` (cross_entropy + kl_divergence, as the kd loss terms call them): no copies when nothing is masked, and a KL whose
             gradient is formed in its forward pass

At this size the loss is memory-bound (each pass over a [1,040, 51,864] fp32 array moves 216 MB), so fewer
passes is what makes it faster. The two run interleaved, --repeats times each; the table gives the median
seconds and the ratio, and checks that both give the same loss and gradient.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from distil.training.losses import IGNORE_INDEX, cross_entropy, kl_divergence


def textbook_loss(student, teacher, labels, temperature=2.0):
    keep = labels != IGNORE_INDEX
    s, t, y = student[keep].float(), teacher[keep].float(), labels[keep]
    ce = F.cross_entropy(s, y)
    log_p_s = F.log_softmax(s / temperature, dim=-1)
    log_p_t = F.log_softmax(t / temperature, dim=-1).clamp(min=torch.finfo(torch.float32).min)
    kl = F.kl_div(log_p_s, log_p_t, reduction="sum", log_target=True) * temperature**2 / s.shape[0]
    return 0.8 * ce + kl


def distil_loss(student, teacher, labels, temperature=2.0):
    return 0.8 * cross_entropy(student, labels) + kl_divergence(student, teacher, labels, temperature)


def timed(fn, student, teacher, labels) -> tuple[float, float, torch.Tensor]:
    s = student.detach().clone().requires_grad_()
    t0 = time.perf_counter()
    loss = fn(s, teacher, labels)
    loss.backward()
    return time.perf_counter() - t0, loss.item(), s.grad


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=1040, help="label tokens in the batch (8 x 130)")
    parser.add_argument("--vocab", type=int, default=51864)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    g = torch.Generator().manual_seed(0)
    student = torch.randn(1, args.tokens, args.vocab, generator=g) * 4
    teacher = torch.randn(1, args.tokens, args.vocab, generator=g) * 4
    labels = torch.randint(0, args.vocab, (1, args.tokens), generator=g)
    impls = {"textbook": textbook_loss, "distil": distil_loss}
    times: dict[str, list[float]] = {name: [] for name in impls}
    results = {}
    for _ in range(args.repeats + 1):  # the first round warms up and is not counted
        for name, fn in impls.items():
            seconds, loss, grad = timed(fn, student, teacher, labels)
            times[name].append(seconds)
            results[name] = (loss, grad)
    (loss_a, grad_a), (loss_b, grad_b) = results.values()
    same = abs(loss_a - loss_b) <= 1e-4 * abs(loss_a) and torch.allclose(grad_a, grad_b, rtol=1e-4, atol=1e-8)
    base = statistics.median(times["textbook"][1:])
    print(
        f"KD loss, forward + backward, [{args.tokens}, {args.vocab}] fp32 logits, {args.repeats} repeats, "
        f"{torch.get_num_threads()} threads; same loss and gradient: {same}"
    )
    print("| implementation | median s | speed-up |")
    print("|---|---|---|")
    for name in impls:
        median = statistics.median(times[name][1:])
        print(f"| {name} | {median:.3f} | {base / median:.2f}x |")


if __name__ == "__main__":
    main()
