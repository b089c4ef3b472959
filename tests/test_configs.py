"""Every config file composes: each stage's main config, and each option of each group under it."""

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import distil.whisper.models  # noqa: F401  (registers the model_dir_name resolver, as every stage command does)
from distil.utils.paths import CONF_DIR

MAIN_CONFIGS = sorted(p.stem for p in CONF_DIR.glob("*.yaml"))
# Groups whose options are whole-run presets rather than swappable parts of every stage.
GLOBAL_GROUPS = {"experiment", "sweep"}


def _group_options():
    for group_dir in sorted(p for p in CONF_DIR.iterdir() if p.is_dir() and p.name != "hydra"):
        for option in sorted(group_dir.glob("*.yaml")):
            yield group_dir.name, option.stem


def _compose(config_name, overrides=()):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = compose(config_name=config_name, overrides=list(overrides), return_hydra_config=False)
    # Resolving catches broken interpolations; `???` (required) values are allowed to stay missing.
    OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    return cfg


def _defaults_groups(config_name):
    text = (CONF_DIR / f"{config_name}.yaml").read_text()
    return {group for group, _ in _group_options() if f"- {group}:" in text or f"- /{group}:" in text}


def test_there_are_main_configs():
    assert MAIN_CONFIGS, f"no main configs in {CONF_DIR}"


@pytest.mark.parametrize("config_name", MAIN_CONFIGS)
def test_main_config_composes(config_name, monkeypatch, tmp_path):
    monkeypatch.setenv("DISTIL_HOME", str(tmp_path))
    cfg = _compose(config_name)
    assert cfg.paths.root == str(tmp_path)


def _preset_stages(group, option):
    """Presets (experiment/, sweep/) name the stage they configure in a `# stage: NAME` header line."""
    header = (CONF_DIR / group / f"{option}.yaml").read_text().splitlines()[:5]
    return [line.split(":", 1)[1].strip() for line in header if line.startswith("# stage:")]


@pytest.mark.parametrize("group, option", list(_group_options()))
def test_every_group_option_composes_in_a_stage_that_uses_it(group, option, monkeypatch, tmp_path):
    monkeypatch.setenv("DISTIL_HOME", str(tmp_path))
    if group in GLOBAL_GROUPS:
        stages = _preset_stages(group, option)
        assert stages, f"conf/{group}/{option}.yaml must start with a '# stage: <main config>' line"
        for name in stages:
            prefix = "" if group in _defaults_groups(name) else "+"
            _compose(name, [f"{prefix}{group}={option}"])
        return
    users = [name for name in MAIN_CONFIGS if group in _defaults_groups(name)]
    if not users:
        pytest.skip(f"no main config puts group {group!r} in its defaults")
    for name in users:
        _compose(name, [f"{group}={option}"])


# ------------------------------------------------------------------ instantiation: no key the code ignores

EXPERIMENTS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))
CPU = ["trainer.accelerator=cpu", "trainer.devices=1", "trainer.strategy=auto", "trainer.precision=32-true"]


@pytest.fixture(scope="module")
def tiny_student(tiny_dir, tmp_path_factory) -> str:
    from distil.whisper.student import init_student

    return str(init_student(tiny_dir, tmp_path_factory.mktemp("student") / "s", decoder_layers=1))


def _train_parts(cfg, tiny_dir, student, out_dir):
    """Every `_target_` of the train config, built as distil-train builds them (teacher/student/paths swapped)."""
    from distil.utils.errors import instantiate

    OmegaConf.set_struct(cfg, False)
    cfg.out_dir = str(out_dir)
    datamodule = instantiate(cfg.data, processor_dir=student)
    module = instantiate(cfg.module, student_dir=student, teacher_dir=tiny_dir)
    callbacks = [instantiate(c) for c in cfg.callbacks.values()]
    loggers = [instantiate(c) for c in cfg.logger.values()]
    return datamodule, module, callbacks, loggers


@pytest.mark.parametrize("experiment", [None, *EXPERIMENTS])
def test_train_config_and_every_experiment_instantiate(
    experiment, tiny_dir, tiny_student, monkeypatch, tmp_path
):
    import lightning as L

    from distil.datamodules.speech import SpeechDataModule
    from distil.modules.distiller import WhisperDistiller
    from distil.utils.errors import instantiate

    monkeypatch.setenv("DISTIL_HOME", str(tmp_path))
    overrides = ([f"experiment={experiment}"] if experiment else []) + CPU
    cfg = _compose("train", overrides)
    datamodule, module, callbacks, loggers = _train_parts(cfg, tiny_dir, tiny_student, tmp_path / "run")
    assert isinstance(datamodule, SpeechDataModule) and isinstance(module, WhisperDistiller)
    weights = {key: term.weight for key, term in module.loss_terms.items()}
    assert weights == {k: t.weight for k, t in cfg.loss.terms.items() if t.weight != 0}
    assert module.optimizer_factory.keywords["lr"] == cfg.optim.lr
    assert datamodule.batch_size == cfg.data.batch_size and datamodule.label_source == cfg.loss.labels
    trainer = instantiate(cfg.trainer, logger=loggers, callbacks=callbacks, default_root_dir=str(tmp_path))
    assert isinstance(trainer, L.Trainer) and trainer.max_steps == cfg.trainer.max_steps


def test_train_config_runs_one_fast_dev_run_step(tiny_dir, tiny_student, tokenizer, monkeypatch, tmp_path):
    """The composed parts train together: one fast_dev_run step and validation batch on local data."""
    from helpers import entry, write_split

    from distil.utils.errors import instantiate

    monkeypatch.setenv("DISTIL_HOME", str(tmp_path))
    write_split(tmp_path / "pl", "a", "train", 4, tokenizer, pl_wer=[0.0] * 4)
    write_split(tmp_path / "corpora", "a", "validation", 2, labelled=False)
    cfg = _compose(
        "train",
        [*CPU, "data.batch_size=2", "val.max_new_tokens=2", f"data.pseudo_labels_dir={tmp_path / 'pl'}"],
    )
    OmegaConf.set_struct(cfg, False)
    cfg.data.datasets = OmegaConf.create([entry("a", tmp_path / "corpora")])
    datamodule, module, callbacks, loggers = _train_parts(cfg, tiny_dir, tiny_student, tmp_path / "run")
    trainer = instantiate(
        cfg.trainer, fast_dev_run=True, logger=loggers, callbacks=callbacks, default_root_dir=str(tmp_path)
    )
    trainer.fit(module, datamodule=datamodule)
    assert trainer.global_step == 1
    assert datamodule.filter_stats["a/train"].kept == 4


# ------------------------------------------------------------------ model sources and evaluation sections


def _check_model_source(node, where: str) -> None:
    """A model config builds its source (its `_target_`); a required `path` (`???`) gets a stand-in."""
    from distil.whisper.sources import ModelSource, model_source

    node = OmegaConf.merge(node, {"path": "org/model"}) if OmegaConf.is_missing(node, "path") else node
    if OmegaConf.is_missing(node, "base"):
        node = OmegaConf.merge(node, {"base": "org/student"})
    assert isinstance(model_source(node), ModelSource), where


def _check_sections(eval_cfg, where: str) -> list[str]:
    """Every `_target_` node of an eval config builds a section whose function takes exactly its keys."""
    import inspect

    from distil.utils.errors import instantiate

    found = []
    for key in eval_cfg:
        node = eval_cfg[key]
        if OmegaConf.is_dict(node) and "_target_" in node:
            section = instantiate(node)
            assert section.func.__module__ == "distil.evaluation.sections", where
            inspect.signature(section.func).bind(None, **section.keywords)  # no key the section ignores
            found.append(key)
    return found


@pytest.mark.parametrize("config_name", MAIN_CONFIGS)
def test_model_configs_and_eval_sections_of_every_main_config_instantiate(config_name, monkeypatch, tmp_path):
    monkeypatch.setenv("DISTIL_HOME", str(tmp_path))
    cfg = _compose(config_name)
    for key in ("teacher", "model"):
        if OmegaConf.is_dict(cfg.get(key)) and "_target_" in cfg[key]:
            _check_model_source(cfg[key], f"{config_name}.{key}")
    if OmegaConf.is_dict(cfg.get("eval")):
        assert "short_form" in _check_sections(cfg.eval, config_name)


@pytest.mark.parametrize(
    "group, option",
    [(g, o) for g, o in _group_options() if g in ("teacher", "model", "eval")],
)
def test_every_model_source_and_eval_section_option_instantiates(group, option, monkeypatch, tmp_path):
    monkeypatch.setenv("DISTIL_HOME", str(tmp_path))
    cfg = _compose("evaluate" if group in ("model", "eval") else "pseudo_label", [f"{group}={option}"])
    if group == "eval":
        sections = _check_sections(cfg.eval, option)
        assert sections[0] == "short_form" and ("long_form" in sections) == (option != "short")
    else:
        _check_model_source(cfg[group], f"{group}={option}")


def test_a_misconfigured_section_names_its_key(monkeypatch, tmp_path):
    """A section key its function does not take fails when the section is called, naming the key."""
    monkeypatch.setenv("DISTIL_HOME", str(tmp_path))
    from distil.utils.errors import instantiate

    cfg = _compose("evaluate", ["eval=full", "+eval.latency.batch_size=4"])
    with pytest.raises(TypeError, match="batch_size"):
        instantiate(cfg.eval.latency)(None)


RUN_DIR_SCRIPT = """
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from distil.utils.paths import CONF_DIR
with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
    cfg = compose("pseudo_label", return_hydra_config=True, overrides=["hydra.job.name=pseudo_label"])
print(OmegaConf.select(cfg, "hydra.run.dir"), OmegaConf.select(cfg, "hydra.run.dir"))
"""


def test_runs_started_in_the_same_second_get_their_own_run_directories():
    import subprocess
    import sys

    procs = [
        subprocess.Popen([sys.executable, "-c", RUN_DIR_SCRIPT], stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=120)[0].split() for p in procs]
    for first, again in outputs:
        assert first == again  # stable within a process
    assert outputs[0][0] != outputs[1][0]
    assert {Path(o[0]).parent.name for o in outputs} == {"pseudo_label"}
