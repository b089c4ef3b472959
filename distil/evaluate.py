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

from distil.config.choices import known_choices
from distil.config.schema import validate
from distil.evaluation.ct2_backend import load_ct2
from distil.evaluation.data import EvalInputError, set_entry
from distil.evaluation.pytorch_backend import PyTorchModel
from distil.evaluation.runtime_backends import detect_runtime_export, load_runtime_export
from distil.evaluation.scoring import failed_sets, primary_metric
from distil.evaluation.sections import EvalRun
from distil.utils.errors import ConfigError, instantiate, one_line_errors
from distil.utils.io import ensure_writable_directory, writable_home, write_atomic
from distil.utils.paths import CONF_DIR
from distil.utils.tensorboard import write_tensorboard
from distil.whisper.ct2_export import check_quantization
from distil.whisper.generation import Guards
from distil.whisper.loading import load_model

log = logging.getLogger(__name__)


def evaluate(cfg: DictConfig, out_dir: str | Path | None = None) -> dict:
    """Evaluate `cfg.model` on `cfg.eval`; write outputs into `out_dir` and return the metrics dict.

    metrics.json: {"model": {...}, "device": {...}, "short_form": {"sets": {name: {...}}, "average": {...}},
    "long_form": {"sets": {name: {"chunked": {...}, "sequential": {...}}}}, "speculative": {...},
    "latency": {...}, "noise": {...}, "backend": "pytorch" | "ctranslate2"}; each section also holds its
    "headline" numbers. Each set entry has "status": "ok" | "no references" | "error". With backend=ctranslate2
    (compute_type: its quantisation) the model is exported into `out_dir/ctranslate2-<compute_type>` and every
    section runs there (long-form through faster-whisper's own algorithms) but speculative decoding ("skipped").
    """
    from distil.utils.runinfo import hydra_output_dir

    out = Path(out_dir) if out_dir is not None else hydra_output_dir() or Path.cwd()
    ensure_writable_directory(out, "hydra.run.dir")  # a read-only destination: before the model loads
    eval_cfg = cfg.eval
    if eval_cfg.get("seed") is not None:
        torch.manual_seed(int(eval_cfg.seed))
    models_root = OmegaConf.select(cfg, "paths.models")
    backend, compute_type = cfg.get("backend", "pytorch"), str(cfg.get("compute_type", "int8"))
    if backend == "ctranslate2":
        check_quantization(compute_type)  # before any work
    # Every set's keys are checked before the model loads (a misspelt key is refused by name).
    sets = {name: set_entry(name, e) for name, e in (eval_cfg.get("sets") or {}).items()}
    guards = Guards.from_config(eval_cfg.get("guards"), "eval.guards")
    long_form = eval_cfg.get("long_form") or {}
    for name, e in (long_form.get("sets") or {}).items():
        set_entry(name, e, "long_form.sets")
    runtime = detect_runtime_export(cfg.model.get("path"))  # a whisper.cpp or openai-whisper export directory
    if runtime and backend != "pytorch":
        raise ConfigError(
            f"backend={backend}: {cfg.model.path} is a {runtime} export, which runs in its own runtime"
        )
    if runtime:
        model = load_runtime_export(runtime, cfg.model.path, cfg.model.get("name"))
        backend = runtime
    else:
        loaded = load_model(cfg.model, cfg.get("device", "auto"), cfg.get("dtype", "auto"), models_root)
        if backend == "ctranslate2":  # the model as faster-whisper runs it: exported into the run directory
            model = load_ct2(loaded, out / f"ctranslate2-{compute_type}", compute_type)
        else:
            model = PyTorchModel.of(loaded)
    log.info("evaluating %s (%s)", model.name, model.path)
    metrics: dict[str, Any] = {"model": model.info(), "device": model.device_info(), "backend": backend}

    device, dtype = cfg.get("device", "auto"), cfg.get("dtype", "auto")
    run = EvalRun(model, eval_cfg, sets, out, device, dtype, models_root, guards)
    for key in eval_cfg:  # each `_target_` node is a section (distil.evaluation.sections), in config order
        node = eval_cfg[key]
        if isinstance(node, DictConfig) and "_target_" in node:
            log.info("%s: %s ...", model.name, key)
            started = time.perf_counter()
            result = instantiate(node)(run)
            log.info("%s: %s done in %.0f s", model.name, key, time.perf_counter() - started)
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


def run_command(cfg: DictConfig) -> dict[str, Any]:
    """What `distil-evaluate` does with its composed config (also `distil.run("evaluate", ...)`): {"metrics": ...}."""
    validate(cfg, "evaluate")  # every key's type and range, before any model or data loads
    from distil.utils.runinfo import write_run_info

    out = write_run_info(cfg)
    return {"metrics": evaluate(cfg, out)}


@writable_home
@known_choices  # an unknown option of a config group (model=nope): one line before Hydra composes
@hydra.main(version_base=None, config_path=str(CONF_DIR), config_name="evaluate")
@one_line_errors
def main(cfg: DictConfig) -> float | None:
    return primary_metric(run_command(cfg)["metrics"])


if __name__ == "__main__":
    main()
