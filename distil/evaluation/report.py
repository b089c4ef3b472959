"""`report.md` (+ `plots/*.png`) of a pipeline run, built only from that run's own files.

Sections: the teacher/student headline table (size, then every evaluation section's headline numbers), the
details (short-form WER per set, long-form WER with its error breakdown and repeated 5-grams, latency per batch
size, speculative decoding, training time) and plots of WER per set,
the training curves (from the run's TensorBoard logs), latency, the pseudo-label WER histogram with the
WER filter, and the long-form error breakdown. A section whose inputs are missing says so and why.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from distil.evaluation.scoring import headline_columns, headlines
from distil.utils.io import write_atomic

REPORT = "report.md"
# WhisperDistiller logs `train/loss` and each loss term as `train/<name>`, beside these counters
NOT_LOSS_TAGS = ("train/tokens", "train/data_epoch", "train/cached_encoder")


def _get(tree: Any, *keys: str) -> Any:
    for key in keys:
        if not isinstance(tree, dict) or key not in tree:
            return None
        tree = tree[key]
    return tree


def _num(value: Any, digits: int = 2) -> str:
    return "-" if not isinstance(value, int | float) else f"{value:.{digits}f}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def _missing(why: str) -> str:
    return f"*Not available: {why}.*"


def comparison_tables(evals: dict[str, dict], train: dict | None) -> str:
    """The headline table, then one table per measured dimension (every number from metrics.json)."""
    if not evals:
        return _missing("no model was evaluated (the evaluate stage did not run or failed)")
    roles = list(evals)
    parts = ["### Headline", headline_table(evals)]
    if any(m.get("backend", "pytorch") != "pytorch" for m in evals.values()):
        parts += ["### Deployed formats", deployment_table(evals)]
    short_sets = sorted({s for m in evals.values() for s in (_get(m, "short_form", "sets") or {})})
    long_sets = sorted({s for m in evals.values() for s in (_get(m, "long_form", "sets") or {})})
    rows = [
        [role, *(_num(_get(m, "short_form", "sets", s, "wer")) for s in short_sets)]
        for role, m in evals.items()
    ]
    parts += ["### Short form, per set"]
    parts += [
        _table(["model", *(f"{s} WER %" for s in short_sets)], rows)
        if short_sets
        else _missing("no short-form set was evaluated")
    ]

    rows = []
    for role in roles:
        for s in long_sets:
            for algo in ("chunked", "sequential"):
                r = _get(evals[role], "long_form", "sets", s, algo)
                if isinstance(r, dict) and "wer" in r:
                    rates = [_num(r.get(k)) for k in ("substitution_rate", "insertion_rate", "deletion_rate")]
                    rows.append([role, s, algo, _num(r["wer"]), *rates, str(r.get("repeated_5grams", "-"))])
    parts += ["### Long form"]
    parts += [
        _table(["model", "set", "algorithm", "WER %", "sub %", "ins %", "del %", "repeated 5-grams"], rows)
        if rows
        else _missing("no long-form set was evaluated")
    ]

    parts += ["### Latency"]
    rows = latency_rows(evals)
    parts += [
        _table(
            [
                "model",
                "batch size",
                "RTFx",
                "tokens/s",
                "generated tokens",
                "decoder ms/token",
                "decoder speed-up",
                "bound (decoder arithmetic)",
            ],
            rows,
        )  # fmt: skip
        + "\n\nDecoder ms/token: generation time minus the encoder's time on the same batches, per generated "
        "token. Speed-up: the teacher's decoder ms/token over this model's at the same batch size. Bound: the "
        "teacher's decoder multiply-accumulates per token over this model's (layers, width, vocabulary, "
        "encoder frames), the most a smaller decoder can gain when arithmetic is the whole cost."
        if rows
        else _missing("the latency section did not run")
    ]

    spec = next((_get(m, "speculative") for m in evals.values() if _get(m, "speculative", "speedup")), None)
    parts += ["### Speculative decoding (student as the teacher's assistant)"]
    parts += [
        _table(
            ["speed-up", "identical to the teacher's greedy output"],
            [[_num(spec.get("speedup")), _num(spec.get("identical_fraction"))]],
        )
        if spec
        else _missing("speculative decoding was not evaluated")
    ]
    parts += ["### Training"]
    parts += [
        _table(
            ["steps", "training time (min)", "best validation WER %"],
            [
                [
                    str(train.get("global_step")),
                    _num((train.get("train_seconds") or 0) / 60, 1),
                    _num(train.get("best_val_wer_weighted")),
                ]
            ],
        )  # fmt: skip
        if train
        else _missing("training did not run in this pipeline run")
    ]
    return "\n\n".join(parts)


def _count_or_num(value: Any) -> str:
    """A headline number: counts (outputs cut, repeated 5-grams) whole, rates with two decimals."""
    return str(value) if isinstance(value, int) and not isinstance(value, bool) else _num(value)


def headline_table(evals: dict[str, dict]) -> str:
    """One row per model: its size, then every section's headline numbers (one this model lacks: -)."""
    columns = headline_columns(evals)
    rows = []
    for role, m in evals.items():
        numbers = headlines(m)
        rows.append(
            [
                role,
                _num((_get(m, "model", "parameters") or 0) / 1e6, 1),
                str(_get(m, "model", "decoder_layers")),
            ]
            + [_count_or_num(numbers.get(key, {}).get("value")) for key in columns]
        )
    return _table(["model", "parameters (M)", "decoder layers", *columns.values()], rows)


def deployment_table(evals: dict[str, dict]) -> str:
    """Each model in each runtime it was evaluated in: what runs it, its files' size, WER and speed."""
    rows = []
    for role, m in evals.items():
        numbers = headlines(m)
        long_form = {k: v for k, v in numbers.items() if k.startswith("long_form_wer_")}
        size = _get(m, "model", "size_bytes")
        rows.append(
            [
                role,
                str(m.get("backend", "pytorch")),
                str(_get(m, "model", "dtype") or "-"),
                _num(size / 1e6, 1) if isinstance(size, int | float) else "-",
                _num(numbers.get("short_form_wer", {}).get("value")),
                " / ".join(
                    f"{k.removeprefix('long_form_wer_')} {_num(v.get('value'))}" for k, v in long_form.items()
                )
                or "-",
                _num(numbers.get("rtfx", {}).get("value")),
            ]
        )
    header = ["model", "runtime", "dtype", "size on disk (MB)", "short-form WER %", "long-form WER %", "RTFx"]
    return _table(header, rows) + (
        "\n\nwhisper.cpp and openai-whisper decode one recording at a time and have no chunked long-form "
        "algorithm; their RTFx includes computing the features (docs/evaluation.md)."
    )


def latency_rows(evals: dict[str, dict]) -> list[list[str]]:
    """One row per model and batch size: speed end to end, then the decoder's own per-token speed against
    the teacher's (measured) and against the ratio of their decoder arithmetic (the bound)."""
    teacher = evals.get("teacher") or {}
    teacher_macs = _get(teacher, "model", "decoder_macs_per_token")
    rows = []
    for role, m in evals.items():
        macs = _get(m, "model", "decoder_macs_per_token")
        bound = teacher_macs / macs if teacher_macs and macs else None
        for b in (_get(m, "latency", "batch_sizes") or {}).values():
            if not isinstance(b, dict):
                continue
            ms = b.get("decoder_ms_per_token")
            teacher_ms = _get(
                teacher, "latency", "batch_sizes", str(b.get("batch_size")), "decoder_ms_per_token"
            )
            speedup = teacher_ms / ms if teacher_ms and ms else None
            rows.append(
                [role, str(b.get("batch_size")), _num(b.get("rtfx")), _num(b.get("tokens_per_second"), 1),
                 str(b.get("tokens", "-")), _num(ms), _num(speedup), _num(bound)]
            )  # fmt: skip
    return rows


def training_scalars(tensorboard_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Loss terms and validation WER averages (tag -> [(step, value)]) from a training run's TensorBoard events."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    curves: dict[str, list[tuple[int, float]]] = {}
    for events in sorted(tensorboard_dir.rglob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events.parent), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags().get("scalars", []):
            loss = tag.startswith("train/") and tag not in NOT_LOSS_TAGS
            if loss or tag.startswith("val/wer"):
                curves.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
    return {tag: sorted(set(points)) for tag, points in curves.items()}


def pseudo_label_wers(labelled: dict) -> list[float]:
    """Every labelled sample's `pl_wer` (those with a reference) across the run's pseudo-label splits."""
    import pyarrow.parquet as pq

    wers: list[float] = []
    for split in (labelled or {}).get("splits", {}).values():
        for shard in sorted(Path(str(split.get("out_dir", ""))).glob("part-*.parquet")):
            wers += [
                w for w in pq.read_table(shard, columns=["pl_wer"]).column(0).to_pylist() if w is not None
            ]
    return wers


def _plot(path: Path, draw: Callable) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    draw(ax)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return f"![{path.stem}](plots/{path.name})"


def _bars(ax, groups: list[str], series: dict[str, list[float]], ylabel: str) -> None:
    width = 0.8 / max(len(series), 1)
    for i, (name, values) in enumerate(series.items()):
        ax.bar([g + i * width for g in range(len(groups))], values, width, label=name)
    ax.set_xticks([g + width * (len(series) - 1) / 2 for g in range(len(groups))], groups)
    ax.set_ylabel(ylabel)
    ax.legend()


def plots(run_dir: Path, results: dict, wer_threshold: float | None) -> list[tuple[str, str]]:
    """(title, markdown) of each plot; a plot whose data is missing says why instead."""
    out, evals, train = run_dir / "plots", results.get("evaluate") or {}, results.get("train")
    sections = []

    sets = sorted({s for m in evals.values() for s in (_get(m, "short_form", "sets") or {})})
    if sets:
        series = {r: [_get(m, "short_form", "sets", s, "wer") or 0 for s in sets] for r, m in evals.items()}
        md = _plot(out / "wer_per_set.png", lambda ax: _bars(ax, sets, series, "short-form WER %"))
    else:
        md = _missing("no short-form set was evaluated")
    sections.append(("WER per model and set", md))

    curves = training_scalars(Path(train["out_dir"]) / "tensorboard") if train else {}
    if curves:

        def draw_curves(ax):
            for tag, points in curves.items():
                ax.plot(*zip(*points, strict=True), label=tag, marker="." if len(points) < 20 else None)
            ax.set_xlabel("step")
            ax.set_yscale("log")
            ax.legend(fontsize=7)

        md = _plot(out / "training_curves.png", draw_curves)
    else:
        md = _missing("training did not run here, or wrote no TensorBoard scalars")
    sections.append(("Training curves (loss terms, validation WER)", md))

    latency = {r: _get(m, "latency", "batch_sizes") or {} for r, m in evals.items()}
    if any(latency.values()):

        def draw_latency(ax):
            for role, by_bs in latency.items():
                points = sorted((b["batch_size"], b["rtfx"]) for b in by_bs.values() if b.get("rtfx"))
                if points:
                    ax.plot(*zip(*points, strict=True), marker="o", label=role)
            ax.set_xlabel("batch size")
            ax.set_ylabel("RTFx (audio s / s)")
            ax.legend()

        md = _plot(out / "latency.png", draw_latency)
    else:
        md = _missing("the latency section did not run")
    sections.append(("Latency", md))

    wers = pseudo_label_wers(results.get("pseudo_label"))
    if wers:
        dropped = _get(train, "data_filter") or {}
        n_wer = sum(s.get("dropped", {}).get("wer", 0) for s in dropped.values() if isinstance(s, dict))

        def draw_hist(ax):
            ax.hist([min(w, 200.0) for w in wers], bins=40)
            if wer_threshold is not None:
                ax.axvline(
                    wer_threshold, color="red", label=f"wer_threshold {wer_threshold:g}: {n_wer} dropped"
                )
                ax.legend()
            ax.set_xlabel("pseudo-label WER % (clipped at 200)")
            ax.set_ylabel("samples")

        md = _plot(out / "pseudo_label_wer.png", draw_hist)
    else:
        md = _missing("pseudo-labelling did not run here, or no sample has a reference")
    sections.append(("Pseudo-label WER and the WER filter", md))

    breakdown = {}
    for role, m in evals.items():
        for s, entry in (_get(m, "long_form", "sets") or {}).items():
            for algo in ("chunked", "sequential"):
                r = _get(entry, algo)
                if isinstance(r, dict) and "wer" in r:
                    breakdown[f"{role}\n{s} {algo}"] = [
                        r.get(k) or 0 for k in ("substitutions", "insertions", "deletions")
                    ]
    if breakdown:
        series = {k: [v[i] for v in breakdown.values()] for i, k in enumerate(("sub", "ins", "del"))}
        md = _plot(out / "longform_errors.png", lambda ax: _bars(ax, list(breakdown), series, "words"))
    else:
        md = _missing("no long-form set was evaluated")
    sections.append(("Long-form errors (substitutions, insertions, deletions)", md))
    return sections


def write_report(run_dir: str | Path, results: dict, wer_threshold: float | None = None) -> Path:
    """Write `<run_dir>/report.md` and its plots from `results` (the pipeline summary) and the run's files."""
    run_dir = Path(run_dir)
    parts = [f"# distil pipeline report\n\nRun directory: `{run_dir}`"]
    parts += [
        "## Teacher and student",
        comparison_tables(results.get("evaluate") or {}, results.get("train")),
    ]
    for title, md in plots(run_dir, results, wer_threshold):
        parts += [f"## {title}", md]
    path = run_dir / REPORT
    run_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(path, "\n\n".join(parts) + "\n")
    return path
