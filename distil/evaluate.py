"""Stage 4: evaluate a Whisper model (teacher, student directory or training checkpoint).

`python -m distil.evaluate model=tiny_en eval=short` writes into the Hydra run directory:
  metrics.json                   everything measured (schema: see `evaluate`), written last, atomically
  predictions/<section>/<set>.jsonl   one line per sample: id, reference, prediction, wer
  tensorboard/                   every numeric metric as a TensorBoard scalar
Sections: each `_target_` node of the eval config (conf/eval/*.yaml: short-form WER per set, long-form
(chunked and/or sequential), speculative decoding, latency, noise robustness; null turns one off) is built
with Hydra and run in order (distil.evaluation.sections). A set that cannot be evaluated (missing file, bad
audio, missing column) gets an error entry, the other sets still run, and the command then exits non-zero
naming it (a set without references is scored as "no references", not an error).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from distil.evaluation.ct2_backend import BACKENDS, load_ct2
from distil.evaluation.data import EvalInputError, set_entry
from distil.evaluation.sections import EvalRun
from distil.utils.errors import instantiate, one_line_errors
from distil.utils.io import write_atomic
from distil.utils.paths import CONF_DIR
from distil.utils.tensorboard import write_tensorboard
from distil.whisper.ct2_export import check_quantization
from distil.whisper.loading import load_model

log = logging.getLogger(__name__)


def evaluate(cfg: DictConfig, out_dir: str | Path | None = None) -> dict:
    """Evaluate `cfg.model` on `cfg.eval`; write outputs into `out_dir` and return the metrics dict.

    metrics.json: {"model": {...}, "device": {...}, "short_form": {"sets": {name: {...}}, "average": {...}},
    "long_form": {"sets": {name: {"chunked": {...}, "sequential": {...}}}}, "speculative": {...},
    "latency": {...}, "noise": {...}, "backend": "pytorch" | "ctranslate2"}. Each set entry has "status": "ok" |
    "no references" | "error". With backend=ctranslate2 (compute_type: its quantisation) the model is exported
    into `out_dir/ctranslate2-<compute_type>` and the short-form sets, latency and long-form (faster-whisper's own
    algorithms) run there; speculative decoding and noise are "skipped".
    """
    from distil.evaluation.latency import device_info
    from distil.utils.runinfo import hydra_output_dir

    out = Path(out_dir) if out_dir is not None else hydra_output_dir() or Path.cwd()
    out.mkdir(parents=True, exist_ok=True)
    eval_cfg = cfg.eval
    if eval_cfg.get("seed") is not None:
        torch.manual_seed(int(eval_cfg.seed))
    models_root = OmegaConf.select(cfg, "paths.models")
    backend, compute_type = cfg.get("backend", "pytorch"), str(cfg.get("compute_type", "int8"))
    if backend not in BACKENDS:
        raise EvalInputError(f"backend={backend!r}: use one of {list(BACKENDS)}")
    if backend == "ctranslate2":
        check_quantization(compute_type)  # before any work
    # Every set's keys are checked before the model loads (a misspelt key is refused by name).
    sets = {name: set_entry(name, e) for name, e in (eval_cfg.get("sets") or {}).items()}
    long_form = eval_cfg.get("long_form") or {}
    for name, e in (long_form.get("sets") or {}).items():
        set_entry(name, e, "long_form.sets")
    whisper = load_model(cfg.model, cfg.get("device", "auto"), cfg.get("dtype", "auto"), models_root)
    if backend == "ctranslate2":  # the model as faster-whisper runs it: exported into the run directory
        whisper = load_ct2(whisper, out / f"ctranslate2-{compute_type}", compute_type)
    log.info("evaluating %s (%s)", whisper.name, whisper.path)
    metrics: dict[str, Any] = {
        "model": whisper.info(),
        "device": whisper.device_info() if backend == "ctranslate2" else device_info(whisper.model.device),
        "backend": backend,
    }

    run = EvalRun(
        whisper, eval_cfg, sets, out, cfg.get("device", "auto"), cfg.get("dtype", "auto"), models_root
    )
    for key in eval_cfg:  # each `_target_` node is a section (distil.evaluation.sections), in config order
        node = eval_cfg[key]
        if isinstance(node, DictConfig) and "_target_" in node:
            log.info("%s: %s ...", whisper.name, key)
            started = time.perf_counter()
            result = instantiate(node)(run)
            log.info("%s: %s done in %.0f s", whisper.name, key, time.perf_counter() - started)
            if result is not None:
                metrics[key] = result

    write_tensorboard(out, metrics)
    write_atomic(out / "metrics.json", json.dumps(metrics, indent=2, default=str) + "\n")
    log.info("metrics written to %s", out / "metrics.json")
    failed = failed_sets(metrics)
    if failed:  # the other sets' results are written; exit status 0 would say the evaluation is complete
        name, error = next(iter(failed.items()))
        raise EvalInputError(
            f"{len(failed)} eval set(s) failed: {', '.join(failed)} (first: {name}: {error}); the other sets' "
            f"results are in {out / 'metrics.json'}. Fix or remove the set{'s' if len(failed) > 1 else ''}"
        )
    return metrics


def failed_sets(metrics: dict) -> dict[str, str]:
    """`{<section>.<set>: error}` of every short-form or long-form set that could not be evaluated."""
    failed = {}
    for section in ("short_form", "long_form"):
        for name, entry in ((metrics.get(section) or {}).get("sets") or {}).items():
            if isinstance(entry, dict) and entry.get("status") == "error":
                failed[f"{section}.{name}"] = entry.get("error", "")
    return failed


def primary_metric(metrics: dict) -> float | None:
    """The number a Hydra sweeper optimises: short-form macro WER, else the first long-form WER."""
    avg = (metrics.get("short_form") or {}).get("average") or {}
    if avg.get("wer_macro") is not None:
        return avg["wer_macro"]
    for entry in ((metrics.get("long_form") or {}).get("sets") or {}).values():
        for algo in ("chunked", "sequential"):
            if isinstance(entry.get(algo), dict) and entry[algo].get("wer") is not None:
                return entry[algo]["wer"]
    return None


@hydra.main(version_base=None, config_path=str(CONF_DIR), config_name="evaluate")
@one_line_errors
def main(cfg: DictConfig) -> float | None:
    from distil.utils.runinfo import write_run_info

    out = write_run_info(cfg)
    metrics = evaluate(cfg, out)
    return primary_metric(metrics)


if __name__ == "__main__":
    main()
