"""Launchers (conf/hydra/launcher/*.yaml) and dry runs: what a command would run, printed without running it.

`hydra/launcher=slurm` (submitit) sizes each job from the stage's own trainer config: `nodes` is
`trainer.num_nodes`, `tasks_per_node` and `gpus_per_node` are `trainer.devices` (one task per GPU, Lightning's
SLURM layout). The resolvers below turn what a stage may hold there (`auto`, a list of GPU ids, nothing at all
for stages without a trainer) into the integers sbatch needs.

`dry_run=true` on distil-train, distil-pseudo-label and distil-pipeline prints the resolved plan (stages,
directories, devices, precision, launcher and, for SLURM, the sbatch header submitit would write) and exits
before any model or dataset is loaded.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf


def _count(value: Any, default: int) -> int:
    """An integer device count from a trainer's `devices` (int, numeric string, list of ids, `auto`, -1)."""
    if isinstance(value, bool) or value is None:
        return default
    if isinstance(value, int):
        return value if value > 0 else default
    if isinstance(value, (list, tuple)) or OmegaConf.is_list(value):
        return len(value) or default
    text = str(value).strip()
    if text.lstrip("-").isdigit():
        return int(text) if int(text) > 0 else default
    if "," in text:  # "0,1,2"
        return len([p for p in text.split(",") if p.strip()])
    return default


def slurm_tasks(devices: Any = 1) -> int:
    """Tasks per node: one per device; `auto`/-1 (a stage that picks its devices at run time): one task."""
    return _count(devices, 1)


def slurm_gpus(accelerator: Any = "gpu", devices: Any = 1) -> int | None:
    """GPUs per node: none for CPU runs, else one per device (`auto`: one)."""
    if str(accelerator).lower() == "cpu":
        return None
    return _count(devices, 1)


OmegaConf.register_new_resolver("slurm_tasks", slurm_tasks, replace=True)
OmegaConf.register_new_resolver("slurm_gpus", slurm_gpus, replace=True)


# ------------------------------------------------------------------------------------------------------
# What the selected launcher would do
# ------------------------------------------------------------------------------------------------------


def full_config(cfg: DictConfig) -> DictConfig:
    """The job config with the `hydra` node put back, so the launcher's `${trainer...}` values resolve."""
    from hydra.core.hydra_config import HydraConfig

    full = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))
    with_hydra = OmegaConf.merge(full, {"hydra": OmegaConf.to_container(HydraConfig.get(), resolve=False)})
    return with_hydra


def launcher_plan(cfg: DictConfig, command: str) -> dict[str, Any]:
    """The selected launcher and its resolved parameters; for SLURM also the sbatch header it would submit."""
    from hydra.core.hydra_config import HydraConfig

    hc = HydraConfig.get()
    name = hc.runtime.choices.get("hydra/launcher", "basic")
    full = full_config(cfg)
    params = OmegaConf.to_container(full.hydra.launcher, resolve=True)
    target = str(params.get("_target_", ""))
    plan: dict[str, Any] = {"name": name}
    multirun = str(hc.mode) == "RunMode.MULTIRUN"
    if "submitit" not in target:
        plan["runs"] = "in this process" if not multirun else "one job after another in this process"
        return plan
    params.pop("_target_", None)
    plan["executor"] = "slurm" if target.endswith("SlurmLauncher") else "local"
    plan["parameters"] = {k: v for k, v in params.items() if v not in (None, {}, [])}
    if not multirun:
        plan["note"] = "a launcher only takes effect with -m (multirun); without it this command runs here"
    if plan["executor"] == "slurm":
        plan["sbatch"] = sbatch_preview(params, command)
    return plan


def sbatch_preview(params: Mapping[str, Any], command: str = "") -> list[str]:
    """The `#SBATCH` lines submitit would write for these launcher parameters (hydra-submitit-launcher's own
    mapping of them), without a cluster: nothing is written or submitted."""
    from unittest import mock

    import submitit
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
    from submitit.slurm import slurm

    params = dict(params)
    folder = params.pop("submitit_folder", "submitit/%j")
    init = {"slurm_max_num_timeout": params.pop("max_num_timeout")} if "max_num_timeout" in params else {}
    base = set(OmegaConf.structured(BaseQueueConf).keys())
    sbatch_params = {k if k in base else f"slurm_{k}": v for k, v in params.items()}
    # submitit refuses to build a SLURM executor where `srun` is missing; the preview only needs its text.
    with mock.patch.object(slurm.SlurmExecutor, "affinity", classmethod(lambda cls: 1)):
        executor = submitit.AutoExecutor(cluster="slurm", folder=folder, **init)
    executor.update_parameters(**sbatch_params)
    text = executor._executor._make_submission_file_text(command or "<job>", "preview")
    return [line for line in text.splitlines() if line.startswith("#SBATCH")]


def trainer_plan(trainer: Mapping[str, Any]) -> dict[str, Any]:
    keys = ("accelerator", "devices", "num_nodes", "strategy", "precision", "max_steps")
    plan = {k: trainer.get(k) for k in keys if k in trainer}
    devices, nodes = trainer.get("devices"), trainer.get("num_nodes", 1)
    if isinstance(devices, int) and isinstance(nodes, int):
        plan["world_size"] = devices * nodes
    return plan


def print_dry_run(stage: str, plan: Mapping[str, Any]) -> None:
    """Print the plan as YAML under a header saying that nothing ran."""
    print(f"# {stage} dry run: nothing was loaded, trained or labelled")
    print(yaml.safe_dump(_plain(plan), sort_keys=False, width=1000).rstrip())


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


# ------------------------------------------------------------------------------------------------------
# Stage plans
# ------------------------------------------------------------------------------------------------------


def model_plan(model: DictConfig) -> dict[str, Any]:
    """A model config as a dry run shows it: its name, its source (`_target_`) and its path."""
    return {"name": model.name, "source": model.get("_target_"), "path": model.get("path")}


def train_plan(cfg: DictConfig) -> dict[str, Any]:
    """What `distil-train` would do with this (resolved) config, read from the config and the run directory."""
    out_dir = Path(str(cfg.out_dir))
    last = out_dir / "checkpoints" / "last.ckpt"
    if cfg.get("ckpt_path") == "last":
        resume = str(last) if last.is_file() else "no checkpoint yet: starts from the initialised student"
    else:
        resume = str(cfg.ckpt_path) if cfg.get("ckpt_path") else "starts over (ckpt_path=null)"
    trainer = trainer_plan(cfg.trainer)
    accumulate = int(cfg.trainer.get("accumulate_grad_batches") or 1)
    trainer["accumulate_grad_batches"] = accumulate
    batch = int(cfg.data.batch_size)
    model = cfg.model
    plan: dict[str, Any] = {
        "run_directory": str(out_dir),
        "resume": resume,
        "teacher": model_plan(cfg.teacher),
        "student": {
            "dir": str(cfg.get("student_dir") or cfg.student.init_dir),
            "encoder_layers": cfg.student.encoder_layers,
            "decoder_layers": cfg.student.decoder_layers,
        },
        "loss": {"name": cfg.loss.get("name"), "labels": cfg.loss.labels},
        "data": {
            "datasets": {str(d.name): str(d.path) for d in cfg.data.get("datasets") or []},
            "pseudo_labels_dir": str(cfg.data.pseudo_labels_dir) if cfg.loss.labels == "pseudo" else None,
            "wer_threshold": cfg.data.get("wer_threshold"),
            "batch_size_per_device": batch,
        },
        "trainer": trainer,
        "model": {
            "attn_implementation": model.get("attn_implementation") or "as loaded (sdpa)",
            "compile": bool(model.get("compile")),
            "freeze_encoder": model.get("freeze_encoder"),
            "gradient_checkpointing": model.get("gradient_checkpointing"),
        },
    }
    if "world_size" in trainer:
        plan["data"]["global_batch_size"] = batch * trainer["world_size"] * accumulate
    return plan
