"""The configuration schema (distil.config.schema): every command checks its config by type and range before any
model or dataset loads, naming the key; every shipped config passes."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, ListConfig
from test_bad_input import _cli, cli_home  # noqa: F401  (a fixture)

from distil.config.schema import RULES, STAGE_RULES, STAGES, validate
from distil.utils.errors import ConfigError
from distil.utils.paths import CONF_DIR

COMMANDS = (
    "corpus",
    "pseudo_label",
    "init_student",
    "train",
    "evaluate",
    "export",
    "import_model",
    "pipeline",
)


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (Path(CONF_DIR) / group).glob("*.yaml"))


def shipped_configs() -> list[tuple[str, list[str]]]:
    """Each command's default config, and each option of the groups it composes (every experiment, recipe,
    eval, loss, student, teacher, trainer and data file)."""
    cases = [(command, []) for command in COMMANDS]
    cases += [("train", [f"experiment={name}"]) for name in options("experiment")]
    cases += [
        ("train", [f"{group}={name}"]) for group in ("loss", "student", "trainer") for name in options(group)
    ]
    cases += [("pseudo_label", [f"teacher={name}"]) for name in options("teacher")]
    cases += [("pseudo_label", [f"data={name}"]) for name in options("data")]
    cases += [("evaluate", [f"eval={name}"]) for name in options("eval")]
    cases += [("pipeline", [f"recipe={name}"]) for name in options("recipe")]
    return cases


@pytest.fixture(scope="module")
def hydra_conf():
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        yield


@pytest.mark.parametrize(("command", "overrides"), shipped_configs())
def test_every_shipped_config_validates(hydra_conf, command, overrides):
    validate(compose(command, overrides), command)


@pytest.mark.parametrize("recipe", options("recipe"))
def test_every_recipe_s_stages_validate(hydra_conf, recipe, tmp_path):
    from distil.pipeline import validate_stages

    validate_stages(compose("pipeline", [f"recipe={recipe}", f"paths.root={tmp_path}"]))


def _keys(node, path=()) -> set[str]:
    """Every key of a composed config (interpolations resolved where they resolve), as dotted paths."""
    keys = set()
    items = node.items_ex(resolve=False) if isinstance(node, DictConfig) else enumerate(node._iter_ex(False))
    for key, _ in items:
        here = (*path, str(key))
        keys.add(".".join(here))
        try:
            value = node[key]
        except Exception:  # `???` and values that need the environment
            continue
        if isinstance(value, DictConfig | ListConfig):
            keys |= _keys(value, here)
    return keys


def test_every_rule_names_a_key_that_exists(hydra_conf):
    """A rule whose pattern matches no key of any shipped config is a typo (it would never fire)."""
    from distil.config.schema import _matches

    keys: dict[str, set[str]] = {command: set() for command in COMMANDS}
    for command, overrides in shipped_configs():
        keys[command] |= _keys(compose(command, overrides))
    everything = set().union(*keys.values())
    dead = [p for p in RULES if not any(_matches(p.split("."), k.split(".")) for k in everything)]
    for command, rules in STAGE_RULES.items():
        dead += [
            f"{command}: {p}"
            for p in rules
            if not any(_matches(p.split("."), k.split(".")) for k in keys[command])
        ]
    assert not dead, dead


@pytest.mark.parametrize("pattern", [*RULES, *(p for rules in STAGE_RULES.values() for p in rules)])
def test_every_rule_refuses_a_value_of_the_wrong_kind(pattern):
    rule = RULES.get(pattern) or next(r[pattern] for r in STAGE_RULES.values() if pattern in r)
    for bad in (object(), {"a": 1.5}):
        try:
            assert not rule.ok(bad), f"{pattern} accepts {bad!r}"
        except ConfigError:
            pass  # a rule that delegates to its own checker (eval.guards) raises the named error itself


# The examples of issue 32 (item 15): each is refused with the key named, before anything loads.
BAD = [
    ("pseudo_label", "batch_size=abc", "batch_size must be a positive integer, got 'abc'"),
    ("train", "data.batch_size=abc", "data.batch_size must be a positive integer, got 'abc'"),
    ("train", "optim.lr=abc", "optim.lr must be a positive number, got 'abc'"),
    ("train", "trainer.max_steps=abc", "trainer.max_steps must be a positive integer, got 'abc'"),
    ("train", "data.wer_threshold=abc", "data.wer_threshold must be a number >= 0 or null, got 'abc'"),
    ("train", "optim.lr=-1e-4", "optim.lr must be a positive number, got -0.0001"),
    ("train", "loss.temperature=0", "loss.temperature must be a positive number, got 0"),
    (
        "train",
        "data.timestamp_probability=2",
        "data.timestamp_probability must be a probability in [0, 1], got 2",
    ),
    (
        "train",
        "student.decoder_layers=abc",
        "student.decoder_layers must be null (all layers), a layer count",
    ),
    ("init_student", "student.decoder_layers=0", "student.decoder_layers must be"),
    ("init_student", "student.decoder_layers=[0,1,0]", "student.decoder_layers must be"),
    ("init_student", "student.encoder_layers=[]", "student.encoder_layers must be"),
    ("pseudo_label", "data.datasets.0.splits=[]", "data.datasets.0.splits must be a non-empty list"),
    (
        "train",
        "data.validation_datasets=[{name: v, path: x, splits: []}]",
        "data.validation_datasets.0.splits",
    ),
    (
        "train",
        "optim.schedule=exponential",
        "optim.schedule must be one of ['constant', 'linear', 'cosine', 'wsd'], got 'exponential'",
    ),
    ("train", "optim.decay_fraction=1.5", "optim.decay_fraction must be a fraction in [0, 1], got 1.5"),
    ("train", "ema.decay=1", "ema.decay must be a number in (0, 1) or null, got 1"),
    (
        "train",
        "checkpoint.average_last=0",
        "checkpoint.average_last must be a positive integer or null, got 0",
    ),
    (
        "train",
        "augment.specaugment.mask_time_length=4000",
        "augment.specaugment.mask_time_length must be a positive integer <= 3000, got 4000",
    ),
    (
        "train",
        "augment.specaugment.mask_feature_length=200",
        "augment.specaugment.mask_feature_length must be a positive integer <= 128, got 200",
    ),
    (
        "train",
        "augment.specaugment.mask_time_prob=1.5",
        "augment.specaugment.mask_time_prob must be a probability in [0, 1], got 1.5",
    ),
    ("train", "augment.bpe_dropout=1.5", "augment.bpe_dropout must be a probability in [0, 1], got 1.5"),
    ("evaluate", "eval.batch_size=0", "eval.batch_size must be a positive integer, got 0"),
    ("evaluate", "eval.guards.no_speech_threshold=2", "eval.guards.no_speech_threshold=2"),
    ("corpus", "sentence_pools.test=1.5", "sentence_pools.test must be a probability in [0, 1], got 1.5"),
    ("pipeline", "stages=[label]", "stages must be a non-empty list (each one of ['corpus'"),
]


@pytest.mark.parametrize(("command", "override", "message"), BAD)
def test_a_bad_value_is_refused_naming_the_key(hydra_conf, command, override, message):
    with pytest.raises(ConfigError) as err:
        validate(compose(command, [override]), command)
    assert str(err.value).startswith(message), err.value


def test_settings_that_cannot_be_combined_are_refused_naming_both_keys(hydra_conf):
    cfg = compose("train", ["augment.specaugment.enabled=true", "encoder_cache.enabled=true"])
    with pytest.raises(
        ConfigError, match=r"^augment.specaugment.enabled=true cannot train with encoder_cache.enabled=true"
    ):
        validate(cfg, "train")
    validate(compose("train", ["augment.specaugment.enabled=true"]), "train")
    validate(compose("train", ["encoder_cache.enabled=true"]), "train")


def test_interpolations_are_resolved_before_the_check(hydra_conf):
    """`loss.terms.kl.temperature` is `${loss.temperature}`; a wrong value is named where it is set."""
    cfg = compose("train", ["loss.temperature=${optim.warmup_steps}", "optim.warmup_steps=0"])
    with pytest.raises(ConfigError, match="^loss.temperature must be a positive number, got 0$"):
        validate(cfg, "train")
    validate(
        compose("train", ["data.wer_threshold=null", "student.encoder_layers=null"]), "train"
    )  # null allowed


def test_a_pipeline_checks_its_stages_before_any_runs(hydra_conf, tmp_path):
    from distil.pipeline import run_pipeline

    cfg = compose("pipeline", [f"paths.root={tmp_path}", "overrides.train=['optim.lr=-1']"])
    with pytest.raises(ConfigError, match=r"^train stage: optim.lr must be a positive number, got -1$"):
        run_pipeline(cfg, tmp_path / "run")
    assert not (tmp_path / "corpora").exists()  # the corpus stage did not start


def test_a_pipeline_finds_an_unwritable_stage_output_before_any_stage_runs(hydra_conf, tmp_path):
    from distil.pipeline import run_pipeline
    from distil.utils.io import OutputNotWritableError

    (tmp_path / "blocker").write_text("a file where the students should go")
    cfg = compose(
        "pipeline", [f"paths.root={tmp_path}", f"paths.students={tmp_path / 'blocker' / 'students'}"]
    )
    with pytest.raises(OutputNotWritableError, match=r"^init_student stage: out_dir=.*blocker/students/"):
        run_pipeline(cfg, tmp_path / "run")
    assert not any(
        (tmp_path / "corpora").iterdir()
    )  # the corpus stage did not start (its directory is checked)


def test_every_rule_is_documented():
    page = (Path(__file__).parents[1] / "docs" / "configuration.md").read_text()
    patterns = [*RULES, *(p for rules in STAGE_RULES.values() for p in rules)]
    assert not [p for p in patterns if f"`{p}`" not in page]


def test_every_stage_has_rules():
    assert set(STAGE_RULES) == set(COMMANDS) and set(STAGES) < set(COMMANDS)


def slow(*args):
    return pytest.param(*args, marks=pytest.mark.slow)  # ~15 s each: a command's start-up


@pytest.mark.parametrize(
    ("module", "overrides", "key"),
    [
        slow("distil.pseudo_label", ["teacher=tiny_random", "batch_size=abc"], "batch_size"),
        ("distil.train", ["teacher=tiny_random", "trainer.max_steps=abc"], "trainer.max_steps"),
        slow("distil.train", ["teacher=tiny_random", "loss.temperature=0"], "loss.temperature"),
        slow(
            "distil.init_student",
            ["teacher=tiny_random", "student.decoder_layers=[1,1]"],
            "student.decoder_layers",
        ),
        slow("distil.pipeline", ["overrides.train=['optim.lr=-1']"], "train stage: optim.lr"),
    ],
)
def test_commands_refuse_a_bad_value_in_one_line_before_anything_loads(cli_home, module, overrides, key):  # noqa: F811
    started = time.monotonic()
    result = _cli(cli_home, module, *overrides)
    assert result.returncode == 1, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: {key} must be ") and "Traceback" not in result.stderr, result.stderr[
        -2000:
    ]
    # Nothing was written: no run record (write_run_info comes after the check), no student, no labels.
    assert not list(cli_home.rglob("run_info.json")) and not (cli_home / "students").exists()
    assert not (cli_home / "pseudo_labels").exists()
    assert time.monotonic() - started < 60
