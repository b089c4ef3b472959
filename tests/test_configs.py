"""Every config file composes: each stage's main config, and each option of each group under it."""

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

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
