"""Turn a Hydra multirun directory into one table (CSV) and one plot (PNG).

    python -m distil.collect <multirun dir> [--x KEY] [--y METRIC ...] [--over KEY] [--out DIR]

Every job directory holds `.hydra/overrides.yaml` (what the job changed) and `metrics.json` (what it
measured, e.g. from `distil.evaluate`). One row per job: the job number, its overrides, its status and every
numeric metric flattened to a dotted column name (`short_form.average.wer_macro`). The plot draws the chosen
metrics against the swept override (default: the first override that varies across jobs). `--over train.seed`
also merges the jobs that differ only in that key (the seeds of one row): each metric's mean and sample standard
deviation over them (`summary_over_<key>.csv`, the plot's error bars).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path

import yaml

from distil.utils.errors import ConfigError

DEFAULT_METRIC_ENDINGS = (".wer", ".wer_macro", ".wer_sample_weighted")
MAX_DEFAULT_LINES = 6


def flatten(tree, prefix: str = "") -> dict[str, float]:
    """Numeric leaves of nested metrics as {"a.b.c": value}; lists, strings, booleans, NaN left out."""
    out: dict[str, float] = {}
    if isinstance(tree, dict):
        for key, value in tree.items():
            out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    elif isinstance(tree, (int, float)) and not isinstance(tree, bool) and math.isfinite(tree):
        out[prefix] = tree
    return out


def read_overrides(job_dir: Path) -> dict[str, str]:
    path = job_dir / ".hydra" / "overrides.yaml"
    if not path.exists():
        return {}
    out = {}
    for item in yaml.safe_load(path.read_text()) or []:
        key, _, value = str(item).partition("=")
        out[key.lstrip("+~")] = value
    return out


def job_dirs(multirun_dir: Path) -> list[Path]:
    """Job directories (those with a `.hydra` folder or a metrics.json), in job-number order."""
    dirs = [
        p
        for p in multirun_dir.iterdir()
        if p.is_dir() and ((p / ".hydra").is_dir() or (p / "metrics.json").exists())
    ]
    return sorted(dirs, key=lambda p: (not p.name.isdigit(), int(p.name) if p.name.isdigit() else 0, p.name))


def collect(multirun_dir: str | Path) -> list[dict]:
    """One row per job: {"job", <override keys>, "status", <flattened metrics>}."""
    root = Path(multirun_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"multirun directory {root} does not exist")
    jobs = job_dirs(root)
    if not jobs:
        raise ConfigError(
            f"{root} holds no job directories (expected <n>/.hydra/overrides.yaml and <n>/metrics.json)"
        )
    rows = []
    for job in jobs:
        row: dict = {"job": job.name, **read_overrides(job)}
        metrics_path = job / "metrics.json"
        if metrics_path.exists():
            try:
                row.update(flatten(json.loads(metrics_path.read_text())))
                row["status"] = "ok"
            except json.JSONDecodeError as err:
                row["status"] = f"unreadable metrics.json: {err}"
        else:
            row["status"] = "no metrics.json (job failed or still running)"
        rows.append(row)
    return rows


def swept_keys(rows: Sequence[dict]) -> list[str]:
    """Override keys whose value differs between jobs (in first-seen order)."""
    metric_like = {k for r in rows for k, v in r.items() if not isinstance(v, str)}
    keys = [
        k
        for k in dict.fromkeys(k for r in rows for k in r)
        if k not in ("job", "status") and k not in metric_like
    ]
    return [k for k in keys if len({r.get(k) for r in rows}) > 1]


def columns(rows: Sequence[dict]) -> list[str]:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    overrides = [
        k for k in keys if k not in ("job", "status") and all(isinstance(r.get(k, ""), str) for r in rows)
    ]
    metrics = sorted(k for k in keys if k not in overrides and k not in ("job", "status"))
    job, status = ([k] if k in keys else [] for k in ("job", "status"))  # merged rows (--over) have neither
    return [*job, *overrides, *status, *metrics]


def aggregate(rows: Sequence[dict], over: str) -> list[dict]:
    """The finished jobs that differ only in `over` as one row: `n` jobs, the values of `over` they had, and per
    metric the mean and, as `<metric>.std`, the sample standard deviation (0 for a single job)."""
    keys = [k for k in swept_keys(rows) if k != over]
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        if row.get("status") == "ok":
            groups.setdefault(tuple(row.get(k) for k in keys), []).append(row)
    metrics = [c for c in columns(rows) if c not in ("job", "status") and c not in keys and c != over]
    out = []
    for values, members in groups.items():
        merged: dict = {
            **dict(zip(keys, values, strict=True)),
            over: ",".join(str(m.get(over)) for m in members),
        }
        merged["n"] = len(members)
        for metric in metrics:
            numbers = [m[metric] for m in members if isinstance(m.get(metric), (int, float))]
            if numbers:
                merged[metric] = statistics.fmean(numbers)
                merged[f"{metric}.std"] = statistics.stdev(numbers) if len(numbers) > 1 else 0.0
        out.append(merged)
    return out


def write_csv(rows: Sequence[dict], path: Path) -> Path:
    cols = columns(rows)
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=cols)
        writer.writeheader()
        for row in rows:
            writer.writerow({c: row.get(c, "") for c in cols})
    return path


def _as_number(value):
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def default_metrics(rows: Sequence[dict]) -> list[str]:
    cols = [c for c in columns(rows) if c.endswith(DEFAULT_METRIC_ENDINGS) and ".details." not in c]
    return cols[:MAX_DEFAULT_LINES]


def plot(
    rows: Sequence[dict], path: Path, x: str | None = None, metrics: Sequence[str] | None = None
) -> Path:
    """Each metric against the swept key (numeric axis when the values are numbers, categories otherwise)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = x or next(iter(swept_keys(rows)), "job")
    metrics = list(metrics or default_metrics(rows))
    xs_raw = [r.get(x) for r in rows]
    numeric = all(_as_number(v) is not None for v in xs_raw)
    order = sorted(range(len(rows)), key=lambda i: _as_number(xs_raw[i]) if numeric else i)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for metric in metrics:
        pts = [(i, rows[i].get(metric)) for i in order if isinstance(rows[i].get(metric), (int, float))]
        if not pts:
            continue
        xs = [_as_number(xs_raw[i]) if numeric else str(xs_raw[i]) for i, _ in pts]
        spread = [rows[i].get(f"{metric}.std") for i, _ in pts]  # aggregated rows: the spread over seeds
        errors = spread if all(isinstance(e, (int, float)) for e in spread) else None
        ax.errorbar(xs, [v for _, v in pts], yerr=errors, marker="o", capsize=3, label=metric)
    ax.set_xlabel(x)
    ax.set_ylabel("value (WER in %)" if all("wer" in m for m in metrics) else "value")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no metric to plot", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def format_table(rows: Sequence[dict], keys: Sequence[str]) -> str:
    """Aligned columns; a metric with a `<metric>.std` beside it reads "mean ± std"."""

    def cell(row, key):
        value, spread = row.get(key), row.get(f"{key}.std")
        if isinstance(value, float) and isinstance(spread, float):
            return f"{value:.2f} ± {spread:.2f}"
        return f"{value:.2f}" if isinstance(value, float) else str(value if value is not None else "")

    table = [list(keys)] + [[cell(r, k) for k in keys] for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(keys))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)) for line in table)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m distil.collect", description=__doc__.split("\n\n")[0])
    parser.add_argument("multirun_dir", type=Path)
    parser.add_argument("--x", help="override key for the x axis (default: the first swept key)")
    parser.add_argument("--y", nargs="+", help="metric columns to plot (default: the WER columns)")
    parser.add_argument(
        "--over", help="merge the jobs that differ only in this override key (e.g. train.seed): mean ± std"
    )
    parser.add_argument(
        "--out", type=Path, help="where to write summary.csv / summary.png (default: the multirun dir)"
    )
    args = parser.parse_args(argv)
    try:
        rows = collect(args.multirun_dir)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out = args.out or args.multirun_dir
    out.mkdir(parents=True, exist_ok=True)
    if args.y:
        unknown = [m for m in args.y if m not in columns(rows)]
        if unknown:
            print(f"error: unknown metric column(s) {unknown}; available: {columns(rows)}", file=sys.stderr)
            return 2
    metrics = args.y or default_metrics(rows)
    csv_path = write_csv(rows, out / "summary.csv")
    if args.over:
        if args.over not in swept_keys(rows):
            print(
                f"error: --over {args.over}: not a key the jobs vary; they vary {swept_keys(rows)}",
                file=sys.stderr,
            )
            return 2
        failed = [r["job"] for r in rows if r.get("status") != "ok"]
        if failed:
            print(f"warning: jobs {failed} have no metrics and are left out of the means", file=sys.stderr)
        rows = aggregate(rows, args.over)
        csv_path = write_csv(rows, out / f"summary_over_{args.over}.csv")
        shown = [k for k in swept_keys(rows) if k != args.over] + ["n", args.over, *metrics]
    else:
        shown = ["job", *swept_keys(rows), "status", *metrics]
    png_path = plot(
        rows, out / (f"summary_over_{args.over}.png" if args.over else "summary.png"), args.x, args.y
    )
    print(format_table(rows, shown))
    print(f"\ntable: {csv_path}\nplot:  {png_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
