"""Launchers for real: submitit's local executor (hydra/launcher=slurm_local) runs multiruns, requeues a
preempted job and labels a shard array; the SLURM launcher is sized by the trainer; dry runs; GPU options.

Every command is run as a user types it (the console scripts, in a subprocess). The local executor goes
through the same submitit code as SLURM (pickled job, signal handlers, requeue); only sbatch/srun differ, and
the SLURM header is checked through submitit's own sbatch writer (no cluster here).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from helpers import TINY_CORPUS, cli, command, write_split

from distil.collect import collect

TEACHER = "whisper-tiny-random"


def dry_run(name: str, *args: str, home: Path) -> dict:
    out = cli(name, *args, "dry_run=true", home=home, timeout=120).stdout
    header, _, body = out.partition("\n")
    assert "dry run: nothing was loaded" in header, out
    return yaml.safe_load(body)


@pytest.fixture
def home(tmp_path, tiny_random_dir) -> Path:
    """A DISTIL_HOME with the tiny random teacher, its pseudo-labels of dataset `a` (pl_wer 0/10/30 %) and the
    raw corpus (train + validation) of `a` and of an unlabelled dataset `c`."""
    from transformers import WhisperTokenizerFast

    models = Path(tiny_random_dir).parent
    (tmp_path / "models").mkdir()
    for name in (TEACHER, "whisper-tiny.en"):  # the random teacher borrows tiny.en's processor
        (tmp_path / "models" / name).symlink_to(models / name)
    tok = WhisperTokenizerFast.from_pretrained(tiny_random_dir)
    write_split(tmp_path / "pseudo_labels" / TEACHER, "a", "train", 12, tok, pl_wer=[0.0, 10.0, 30.0] * 4)
    write_split(tmp_path / "corpora", "a", "train", 12, labelled=False)
    write_split(tmp_path / "corpora", "a", "validation", 4, labelled=False, id_offset=500)
    write_split(tmp_path / "corpora", "c", "train", 6, labelled=False, id_offset=900)
    return tmp_path


def train_overrides(home: Path, steps: int = 2) -> list[str]:
    return [
        "teacher=tiny_random",
        "student=1dec",
        "trainer=debug",
        f"trainer.max_steps={steps}",
        "data=custom",
        f"data.datasets.0.path={home}/corpora/a",
        "data.datasets.0.name=a",
        "data.datasets.0.id_column=id",
        "data.datasets.0.duration_column=duration",
        "data.batch_size=2",
        "data.max_val_samples=2",
        "val.max_new_tokens=4",
        "export=false",
    ]


def multirun_dir(home: Path, stage: str) -> Path:
    (found,) = sorted((home / "runs" / f"{stage}-multirun").iterdir())
    return found


# ------------------------------------------------------------------------------------------------------
# The SLURM launcher is sized by the trainer; site file; dry runs; GPU configs without a GPU
# ------------------------------------------------------------------------------------------------------


@pytest.mark.slow  # ~27 s of subprocesses; the default tier keeps the requeue test
def test_slurm_launcher_takes_nodes_and_tasks_from_the_trainer(home):
    site = home / "site_conf" / "hydra" / "launcher" / "site"
    site.mkdir(parents=True)
    (site / "default.yaml").write_text("partition: big-gpu\naccount: proj42\nqos: high\n")
    plan = dry_run(
        "train",
        "--config-dir",
        str(home / "site_conf"),
        "hydra/launcher=slurm",
        "trainer=ddp",
        "trainer.num_nodes=2",
        "model.attn_implementation=flash_attention_2",
        "model.compile=true",
        home=home,
    )
    trainer, launcher = plan["trainer"], plan["launcher"]
    assert (trainer["accelerator"], trainer["devices"], trainer["num_nodes"]) == ("gpu", 8, 2)
    assert (trainer["strategy"], trainer["precision"], trainer["world_size"]) == ("ddp", "bf16-mixed", 16)
    assert plan["model"]["attn_implementation"] == "flash_attention_2" and plan["model"]["compile"] is True
    assert plan["data"]["global_batch_size"] == 16 * plan["data"]["batch_size_per_device"]
    params = launcher["parameters"]
    assert (launcher["executor"], params["nodes"], params["tasks_per_node"], params["gpus_per_node"]) == (
        "slurm",
        2,
        8,
        8,
    )
    sbatch = set(launcher["sbatch"])  # what submitit would submit, written by submitit itself
    for line in ("--nodes=2", "--ntasks-per-node=8", "--gpus-per-node=8", "--partition=big-gpu"):
        assert f"#SBATCH {line}" in sbatch, sbatch
    assert {"#SBATCH --account=proj42", "#SBATCH --qos=high", "#SBATCH --signal=USR2@120"} <= sbatch
    run_dir = Path(plan["run_directory"])
    assert not run_dir.exists() and not (home / "students").exists()  # nothing trained, nothing built

    # Other shapes through the same rule: 4 GPUs on 3 nodes; one GPU; a CPU run asks for no GPU.
    four = dry_run(
        "train", "hydra/launcher=slurm", "trainer=ddp", "trainer.devices=4", "trainer.num_nodes=3", home=home
    )
    p = four["launcher"]["parameters"]
    assert (p["nodes"], p["tasks_per_node"], p["gpus_per_node"], four["trainer"]["world_size"]) == (
        3,
        4,
        4,
        12,
    )
    assert "partition" not in p  # no site file without --config-dir (and none in this checkout's conf)
    one = dry_run("train", "hydra/launcher=slurm", "trainer=gpu", home=home)
    assert (one["trainer"]["precision"], one["launcher"]["parameters"]["tasks_per_node"]) == ("bf16-mixed", 1)
    cpu = dry_run("train", "hydra/launcher=slurm", "trainer=cpu", home=home)
    assert "gpus_per_node" not in cpu["launcher"]["parameters"]
    assert not any("gpus" in line for line in cpu["launcher"]["sbatch"])


def test_dry_runs_of_labelling_and_pipeline(home, tiny_random_dir):
    label = dry_run(
        "pseudo-label",
        "hydra/launcher=slurm",
        "teacher=tiny_random",
        "data=custom",
        f"data.datasets.0.path={home}/corpora/c",
        "shard.index=1",
        "shard.count=3",
        home=home,
    )
    # trainer.devices=auto (Lightning's choice on the node): one task with one GPU per array job
    assert label["launcher"]["parameters"]["tasks_per_node"] == 1
    assert label["launcher"]["parameters"]["gpus_per_node"] == 1
    assert label["shard"] == {"index": 1, "count": 3, "shard_size": 1000}
    assert "total not known" in label["splits"]["custom/train"]["state"]

    pipe = dry_run(
        "pipeline",
        "recipe.teacher=tiny_random",
        "recipe.student=1dec",
        "recipe.experiment=tiny_random_smoke",
        home=home,
    )
    stages = pipe["stages"]
    assert list(stages) == ["corpus", "pseudo_label", "init_student", "train", "evaluate"]
    assert stages["train"]["command"] == "distil-train experiment=tiny_random_smoke"
    assert (
        stages["train"]["trainer"]["max_steps"] == 4 and stages["train"]["trainer"]["precision"] == "32-true"
    )
    assert pipe["launcher"]["name"] == "basic"
    assert not (home / "students").exists() and not (home / "pseudo_labels" / TEACHER / "espeak").exists()


def test_model_options_reach_the_models_and_train(tmp_path, tiny_random_dir, monkeypatch):
    """`model.attn_implementation` and `model.compile` are applied for real: a tiny CPU compile (dynamo with
    the eager backend, no C++ toolchain needed) trains and checkpoints under the usual parameter names."""
    import lightning as L
    from hydra import compose, initialize_config_dir

    from distil.train import train
    from distil.utils.paths import CONF_DIR

    home = tmp_path
    monkeypatch.setenv("DISTIL_HOME", str(home))
    (home / "models").mkdir()
    for name in (TEACHER, "whisper-tiny.en"):
        (home / "models" / name).symlink_to(Path(tiny_random_dir).parent / name)
    from transformers import WhisperTokenizerFast

    tok = WhisperTokenizerFast.from_pretrained(tiny_random_dir)
    write_split(home / "pseudo_labels" / TEACHER, "a", "train", 4, tok, pl_wer=[0.0] * 4)
    write_split(home / "corpora", "a", "train", 4, labelled=False)
    write_split(home / "corpora", "a", "validation", 2, labelled=False, id_offset=500)
    seen = {}

    class Probe(L.Callback):
        def on_train_start(self, trainer, pl_module):
            for name in ("student", "teacher"):
                model = getattr(pl_module, name)
                seen[name] = (
                    model.config._attn_implementation,
                    model.model.encoder._compiled_call_impl is not None,
                    model.model.decoder._compiled_call_impl is not None,
                )

    overrides = [
        *train_overrides(home, steps=2),
        "trainer.limit_val_batches=0",
        "model.attn_implementation=eager",
        "model.compile=true",
        "model.compile_options={backend: eager}",
        f"out_dir={home / 'run'}",
    ]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = compose("train", overrides=overrides)
    summary = train(cfg, callbacks=[Probe()])
    assert seen == {"student": ("eager", True, True), "teacher": ("eager", True, True)}
    assert summary["global_step"] == 2
    import torch

    state = torch.load(home / "run" / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    assert "student.model.decoder.layers.0.self_attn.q_proj.weight" in state
    assert not any("_orig_mod" in k for k in state)


# ------------------------------------------------------------------------------------------------------
# submitit's local executor
# ------------------------------------------------------------------------------------------------------


@pytest.mark.slow  # about 15 s: two submitit jobs, then the collector (the collector alone: test_collect.py)
def test_train_multirun_through_submitit_and_the_collector(home):
    """`distil-train -m hydra/launcher=slurm_local data.wer_threshold=5,50`: two submitit jobs, each its own
    job directory and training run directory; the collector turns the multirun into its table."""
    cli(
        "train",
        "-m",
        "hydra/launcher=slurm_local",
        "data.wer_threshold=5,50",
        *train_overrides(home),
        home=home,
    )
    sweep = multirun_dir(home, "train")
    assert len(list((sweep / ".submitit").glob("[0-9]*"))) == 2  # two submitit jobs
    rows = collect(sweep)
    assert [(r["job"], r["data.wer_threshold"], r["status"]) for r in rows] == [
        ("0", "5", "ok"),
        ("1", "50", "ok"),
    ]
    # The WER filter did its job: 1 of 3 pseudo-labels is below 5 %, 3 of 3 below 50 %.
    kept = [r["data_filter.a/train.kept"] for r in rows]
    assert kept == [4, 12], rows
    out_dirs = {yaml.safe_load((sweep / r["job"] / "config.yaml").read_text())["out_dir"] for r in rows}
    assert len(out_dirs) == 2 and all((Path(d) / "checkpoints" / "last.ckpt").is_file() for d in out_dirs)


@pytest.mark.slow  # about 30 s: a submitit job preempted, requeued and resumed
def test_preempted_job_is_requeued_by_submitit_and_resumes(home):
    """SIGTERM then USR2 (how SLURM preempts a submitit job; submitit's own `_interrupt` sends the same pair) to
    a training job of a local multirun: submitit requeues it and it resumes from last.ckpt."""
    steps = 40
    over = [
        *train_overrides(home, steps=steps),
        "checkpoint.every_n_steps=2",
        "trainer.val_check_interval=1000",
    ]
    env = {**os.environ, "DISTIL_HOME": str(home), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [*command("train"), "-m", "hydra/launcher=slurm_local", "name=preempt", *over],
        env=env,
        cwd=home,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.time() + 120
        while not list((home / "students" / "preempt").glob("*/checkpoints/last.ckpt")):
            assert proc.poll() is None and time.time() < deadline, proc.stdout.read()[-3000:]
            time.sleep(0.1)
        (job_dir,) = (multirun_dir(home, "train") / ".submitit").glob("[0-9]*")
        controller = int(job_dir.name)  # submitit's local job id is its controller's pid
        (task,) = map(int, Path(f"/proc/{controller}/task/{controller}/children").read_text().split())
        os.kill(task, signal.SIGTERM)
        time.sleep(0.5)
        os.kill(task, signal.SIGUSR2)
        output, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, output[-3000:]
    log = "".join(p.read_text() for p in job_dir.glob(f"{controller}_0_log.*"))  # submitit logs to both
    assert "Bypassing signal SIGTERM" in log and "Caught signal SIGUSR2" in log
    assert f"Requeued job {controller}" in log
    assert log.count("Starting with JobEnvironment") == 2  # the same job, started twice
    metrics = yaml.safe_load((multirun_dir(home, "train") / "0" / "metrics.json").read_text())
    assert metrics["global_step"] == steps
    assert metrics["resumed_from"] and metrics["resumed_from"].endswith("checkpoints/last.ckpt")


def label_overrides(home: Path, tiny_random_dir) -> list[str]:
    return [
        "teacher=tiny_random",
        f"teacher.path={tiny_random_dir}",
        "data=custom",
        f"data.datasets.0.path={home}/corpora/c",
        "data.datasets.0.id_column=id",
        "data.datasets.0.duration_column=duration",
        "batch_size=2",
        "shard_size=2",  # 6 clips: 3 shards
        "progress_bar=false",
        "trainer.accelerator=cpu",
        "trainer.devices=1",
    ]


def labelled(out: Path) -> tuple[list[dict], dict]:
    split = out / "custom" / "train"
    assert (split / "_SUCCESS").is_file()
    rows = [r for f in sorted(split.glob("part-*.parquet")) for r in pq.read_table(f).to_pylist()]
    return sorted(rows, key=lambda r: r["pl_index"]), yaml.safe_load((split / "summary.json").read_text())


@pytest.mark.slow  # ~27 s: a job array of labelling subprocesses
def test_labelling_as_a_job_array_matches_one_job(home, tiny_random_dir):
    """`distil-pseudo-label -m hydra/launcher=slurm_local 'shard.index=range(0,3)' shard.count=3`: three
    submitit jobs label a shard each and the last one merges; the result is the single job's."""
    base = label_overrides(home, tiny_random_dir)
    cli("pseudo-label", *base, f"out_dir={home}/single", home=home)
    cli(
        "pseudo-label",
        "-m",
        "hydra/launcher=slurm_local",
        "shard.index=range(0,3)",
        "shard.count=3",
        *base,
        f"out_dir={home}/array",
        home=home,
    )
    assert len(list((multirun_dir(home, "pseudo_label") / ".submitit").glob("[0-9]*"))) == 3
    single_rows, single_summary = labelled(home / "single")
    array_rows, array_summary = labelled(home / "array")
    assert len(array_rows) == 6 and array_rows == single_rows
    assert array_summary == single_summary
    manifests = sorted((home / "array" / "custom" / "train" / "_progress").glob("part-*.json"))
    assert len(manifests) == 3


@pytest.mark.slow  # ~37 s: the default run's array test covers the merge by the last job
def test_explicit_merge_names_missing_shards_then_merges(home, tiny_random_dir):
    base = label_overrides(home, tiny_random_dir)
    out = f"out_dir={home}/labels"
    split = home / "labels" / "custom" / "train"
    cli(
        "pseudo-label",
        "-m",
        "hydra/launcher=slurm_local",
        "shard.index=0,2",
        "shard.count=3",
        *base,
        out,
        home=home,
    )
    assert not (split / "_SUCCESS").exists()
    failed = cli("pseudo-label", *base, out, "merge=true", home=home, check=False)
    assert failed.returncode == 1
    assert "custom/train: 1 of 3 shards missing (1)" in failed.stderr and "shard.index" in failed.stderr
    cli("pseudo-label", *base, out, "shard.index=1", "shard.count=3", home=home)  # the last job merges
    rows, summary = labelled(home / "labels")
    # A last job that died between its last shard and the merge: merge=true finishes the split (no teacher).
    for name in ("_SUCCESS", "summary.json", "distil_labels.json", "skipped.jsonl"):
        (split / name).unlink()
    merged = cli("pseudo-label", *base, out, "merge=true", "teacher.path=/nonexistent", home=home)
    assert "custom/train: merged 3 shards, 6 samples" in merged.stdout
    assert labelled(home / "labels") == (rows, summary)
    assert yaml.safe_load((split / "distil_labels.json").read_text())["teacher"]["path"] == str(
        tiny_random_dir
    )


@pytest.mark.slow  # ~34 s: the default run's train multirun covers submitit and the collector
def test_pipeline_multirun_through_submitit_and_the_collector(home, tiny_random_dir):
    """`distil-pipeline -m hydra/launcher=slurm_local train.wer_threshold=105,200`: one distilled and evaluated
    student per threshold (corpus and labels made once beforehand), collected into one table."""
    corpus = TINY_CORPUS
    tiny = [
        f"paths.models={home / 'models'}",
        "recipe.teacher=tiny_random",
        "recipe.student=1dec",
        "recipe.experiment=tiny_random_smoke",
        "deploy_compute_type=null",
        "overrides.corpus=[" + ",".join(f"'{o}'" for o in corpus) + "]",
        "overrides.pseudo_label=['data=synthetic','batch_size=4','progress_bar=false','trainer.devices=1']",
        "overrides.evaluate=['eval=demo','eval.max_samples=2','eval.long_form.chunk_length_s=10',"
        "'eval.speculative.samples=2','eval.latency.samples=2','eval.latency.batch_sizes=[2]',"
        "'eval.noise.samples=2','eval.noise.snr_db=[10]','eval.max_new_tokens=8']",
    ]
    cli("pipeline", *tiny, "stages=[corpus,pseudo_label]", home=home, timeout=600)
    cli(
        "pipeline",
        "-m",
        "hydra/launcher=slurm_local",
        "train.wer_threshold=105,200",  # the random teacher's labels: WER 100-122 %
        *tiny,
        "stages=[init_student,train,evaluate]",
        home=home,
        timeout=600,
    )
    rows = collect(multirun_dir(home, "pipeline"))
    assert [(r["train.wer_threshold"], r["status"]) for r in rows] == [("105", "ok"), ("200", "ok")]
    assert all(isinstance(r.get("short_form.average.wer_sample_weighted"), float) for r in rows), rows
