"""Every command's configuration checked once, by type and range, before any model or dataset loads.

`RULES` (the shared config groups) and `STAGE_RULES` (each command's own keys) map a key pattern to what its
value must be; `validate(cfg, stage)`, the first line of every command, walks the composed config
(interpolations resolved) and raises a `ConfigError` naming the first key whose value breaks its rule:

    optim.lr must be a positive number, got 'abc'

A pattern is a dotted key whose parts may hold `*` wildcards (fnmatch, within one part): `data.datasets.*.splits`
matches every dataset entry's splits, `loss.*_weight` every loss weight. The YAML stays plain: a key without a
rule is not checked here (strings such as paths and column names are checked where they are used, against
the files). To add a key: give it a rule below, and a row in docs/configuration.md#accepted-values.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from distil.data.audio import NOISE_TYPES
from distil.datamodules.speech import STOPPING_STRATEGIES
from distil.evaluation.ct2_backend import BACKENDS
from distil.evaluation.longform import ALGORITHMS
from distil.modules.transcriber import DTYPES
from distil.training.augment import SPECAUGMENT_WITH_CACHE
from distil.training.optim import SCHEDULES
from distil.training.trackers import missing_tracker_package
from distil.utils.errors import ConfigError
from distil.utils.hub import is_repo_id
from distil.whisper.export_formats import FORMATS

STAGES = ("corpus", "pseudo_label", "init_student", "train", "evaluate")  # distil-pipeline's, in order


@dataclass(frozen=True)
class Rule:
    expects: str  # "a positive number": the error says "<key> must be <expects>, got <value>"
    ok: Callable[[Any], bool]

    def __or__(self, other: Rule) -> Rule:
        return Rule(f"{self.expects} or {other.expects}", lambda v: self.ok(v) or other.ok(v))


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _in_unit_interval(v: Any) -> bool:
    return _is_number(v) and 0 <= v <= 1


boolean = Rule("true or false", lambda v: isinstance(v, bool))
integer = Rule("an integer", _is_int)
number = Rule("a number", _is_number)
count = Rule("a positive integer", lambda v: _is_int(v) and v >= 1)
non_negative_int = Rule("an integer >= 0", lambda v: _is_int(v) and v >= 0)
positive = Rule("a positive number", lambda v: _is_number(v) and v > 0)
non_negative = Rule("a number >= 0", lambda v: _is_number(v) and v >= 0)
probability = Rule("a probability in [0, 1]", _in_unit_interval)
null = Rule("null", lambda v: v is None)
auto = Rule("auto", lambda v: v == "auto")


def optional(rule: Rule) -> Rule:
    return rule | null


def one_of(*choices: Any) -> Rule:
    return Rule(f"one of {list(choices)}", lambda v: not isinstance(v, list | dict) and v in choices)


def at_most(limit: float, rule: Rule) -> Rule:
    return Rule(f"{rule.expects} <= {limit:g}", lambda v: rule.ok(v) and v <= limit)


def list_of(rule: Rule, length: int | None = None) -> Rule:
    size = "a list" if length is None else f"a list of {length}"
    return Rule(
        f"{size} (each {rule.expects})",
        lambda v: isinstance(v, list) and (length is None or len(v) == length) and all(map(rule.ok, v)),
    )


def non_empty(rule: Rule) -> Rule:
    return Rule(f"a non-empty {rule.expects.removeprefix('a ')}", lambda v: rule.ok(v) and len(v) > 0)


def _layer_spec_ok(value: Any) -> bool:
    """The student's own parser (distil.whisper.student) decides; the teacher's depth is checked once it loads."""
    from distil.whisper.student import resolve_layers

    if isinstance(
        value, list
    ):  # indices, against a teacher so deep that i and -j never meet (the real one: at init)
        try:
            resolve_layers(value, n_teacher=1 + 2 * max((abs(i) for i in value if _is_int(i)), default=0))
        except ConfigError:
            return False
        return True
    return value is None or count.ok(value)


layer_spec = Rule(
    "null (all layers), a layer count >= 1 or a non-empty list of distinct layer indices", _layer_spec_ok
)


def _guards_ok(value: Any) -> bool:
    """eval.guards: its own table of ranges (distil.whisper.generation.GUARD_BOUNDS), whose errors name the key."""
    from distil.whisper.generation import Guards

    if value is not None and not isinstance(value, dict):
        return False
    Guards.from_config(value, "eval.guards")
    return True


def _precisions() -> tuple:
    import typing

    from lightning.fabric.connector import _PRECISION_INPUT

    return tuple(v for literal in typing.get_args(_PRECISION_INPUT) for v in typing.get_args(literal))


split_name = Rule("a split name", lambda v: isinstance(v, str) and v != "")
text = Rule("a non-empty string", lambda v: isinstance(v, str) and v != "")
# The upload keys of the commands that write a model (distil.utils.hub): checked before any model loads.
HUB_RULES: dict[str, Rule] = {
    "push_to_hub": optional(Rule("a Hub repository id owner/name", is_repo_id)),
    "hub.private": boolean,
    "hub.revision": optional(text),
    "hub.commit_message": optional(text),
}

# Key pattern -> rule, for the config groups several commands share (teacher, student, data, trainer, ...).
RULES: dict[str, Rule] = {
    # conf/teacher, conf/model
    "teacher.multilingual": optional(boolean),
    "teacher.random.*_layers": count,
    "teacher.random.d_model": count,
    "teacher.random.attention_heads": count,
    "teacher.random.ffn_dim": count,
    "teacher.random.eot_after": count,
    "teacher.random.seed": integer,
    "model.multilingual": optional(boolean),
    # conf/student: what distil.whisper.student.resolve_layers accepts
    "student.encoder_layers": layer_spec,
    "student.decoder_layers": layer_spec,
    # conf/data: the dataset entries of labelling and training
    "data.datasets": non_empty(list_of(Rule("a dataset entry", lambda v: isinstance(v, dict)))),
    "data.*datasets.*.splits": non_empty(list_of(split_name)),
    "data.datasets.*.weight": positive | non_empty(list_of(positive)),
    # conf/trainer (labelling's trainer: devices and nodes only)
    "trainer.devices": count
    | auto
    | Rule("-1 (all)", lambda v: v == -1)
    | non_empty(list_of(non_negative_int))
    | Rule("device ids as text ('0,1')", lambda v: isinstance(v, str) and re.fullmatch(r"\d+(,\d+)*,?", v)),
    "trainer.num_nodes": count,
    "trainer.max_steps": count,
    "trainer.precision": Rule(
        "a Lightning precision (32-true, 16-mixed, bf16-mixed, ...)", lambda v: v in _precisions()
    ),
    "trainer.gradient_clip_val": optional(non_negative),
    "trainer.accumulate_grad_batches": count,
    "trainer.val_check_interval": count
    | Rule("a fraction in (0, 1]", lambda v: isinstance(v, float) and 0 < v <= 1),
    "trainer.check_val_every_n_epoch": optional(count),
    "trainer.limit_val_batches": optional(non_negative),
    "trainer.num_sanity_val_steps": Rule("an integer >= -1", lambda v: _is_int(v) and v >= -1),
    "trainer.log_every_n_steps": count,
    "trainer.enable_progress_bar": boolean,
    "trainer.deterministic": boolean,
    "trainer.sync_batchnorm": boolean,
    # dry_run's estimate (labelling and training)
    "estimate.audio_hours": optional(positive),
    "estimate.unit_seconds": positive,
    "dry_run": boolean,
    "seed": integer,
    "force": boolean,
    "encoder_cache.enabled": boolean,
}

# Each command's own keys (its conf/<command>.yaml and the groups only it composes).
STAGE_RULES: dict[str, dict[str, Rule]] = {
    "pseudo_label": {
        "generation.num_beams": count,
        "generation.max_new_tokens": count,
        "generation.return_timestamps": boolean,
        "dtype": one_of(*DTYPES),
        "attn_implementation": one_of("sdpa", "eager"),
        "batch_size": count,
        "num_workers": non_negative_int,
        "threads_per_process": count | auto,
        "streaming": boolean,
        "shard_size": count,
        "min_shards": count,
        "shard.index": non_negative_int,
        "shard.count": count,
        "packing.enabled": boolean,
        "packing.max_seconds": positive,
        "packing.min_seconds": optional(non_negative),
        "packing.single_probability": optional(probability),
        "packing.without_speaker": Rule("null (refuse) or clips", lambda v: v in (None, "clips")),
        "progress_bar": boolean,
        "progress_log_every_s": positive,
        "merge": boolean,
    },
    "train": {
        "ckpt_path": Rule("last, null or a checkpoint file", lambda v: v is None or isinstance(v, str)),
        "resume": one_of("auto", "force"),
        "resume_data_changed": one_of("error", "warn"),
        "export": boolean,
        "export_ctranslate2": list_of(Rule("a quantization name", lambda v: isinstance(v, str))),
        "record_samples": boolean,
        "model.freeze_encoder": auto | boolean,
        "model.freeze_embed_*": boolean,
        "model.share_encoder": optional(boolean),
        "model.dropout": optional(probability),
        "model.gradient_checkpointing": boolean,
        "model.attn_implementation": optional(one_of("sdpa", "eager", "flash_attention_2")),
        "model.compile": boolean,
        "optim.lr": positive,
        "optim.weight_decay": non_negative,
        "optim.betas": list_of(Rule("a number in [0, 1)", lambda v: _is_number(v) and 0 <= v < 1), length=2),
        "optim.eps": positive,
        "optim.warmup_steps": non_negative_int,
        "optim.schedule": one_of(*SCHEDULES),
        "optim.min_lr_ratio": Rule("a number in [0, 1]", _in_unit_interval),
        "optim.decay_fraction": Rule("a fraction in [0, 1]", _in_unit_interval),
        "loss.labels": one_of("pseudo", "text"),
        "loss.temperature": positive,
        "loss.*_weight": non_negative,
        "data.streaming": boolean,
        "data.validation_splits": list_of(split_name),
        "data.max_val_samples": optional(count),
        "data.batch_size": count,
        "data.val_batch_size": count,
        "data.num_workers": non_negative_int,
        "data.wer_threshold": optional(non_negative),
        "data.wer_inclusive": boolean,
        "data.drop_uppercase": boolean,
        "data.drop_truncated": boolean,
        "data.max_compression_ratio": optional(positive),
        "data.max_tokens_per_second": optional(positive),
        "data.min_duration_s": optional(non_negative),
        "data.max_duration_s": optional(positive),
        "data.max_label_length": count,
        "data.timestamp_probability": probability,
        "data.condition_on_prev_probability": probability,
        "data.stopping_strategy": one_of(*STOPPING_STRATEGIES),
        "data.shuffle_buffer_size": count,
        "data.max_train_samples": optional(count),
        "val.max_new_tokens": count,
        "val.num_beams": count,
        "checkpoint.every_n_steps": count,
        "checkpoint.average_last": optional(count),
        "ema.decay": optional(Rule("a number in (0, 1)", lambda v: _is_number(v) and 0 < v < 1)),
        "augment.specaugment.enabled": boolean,
        "augment.specaugment.consistent": boolean,
        "augment.specaugment.mask_*_prob": probability,
        # a span longer than its axis: Whisper's 3000 frames; the largest mel axis (large-v3's 128 bins), the
        # model's own (80 for the others) checked when the student's config is read
        "augment.specaugment.mask_time_length": at_most(3000, count),
        "augment.specaugment.mask_feature_length": at_most(128, count),
        "augment.specaugment.mask_*_min_masks": non_negative_int,
        "augment.bpe_dropout": probability,
        # conf/logger: the trackers selected with logger=
        "logger.*": Rule(
            "a Lightning logger config (a mapping with _target_)",
            lambda v: isinstance(v, dict) and "_target_" in v,
        ),
        **HUB_RULES,
    },
    "evaluate": {
        "backend": one_of(*BACKENDS),
        "dtype": one_of("auto", "float32", "float16", "bfloat16"),
        "eval.batch_size": count,
        "eval.max_new_tokens": count,
        "eval.num_beams": count,
        "eval.max_samples": optional(count),
        "eval.skip_bad_audio": boolean,
        "eval.fail_fast": boolean,
        "eval.seed": optional(integer),
        "eval.guards": Rule("null or a mapping of guard settings", _guards_ok),
        "eval.sets.*.max_samples": optional(count),
        "eval.long_form.sets.*.max_samples": optional(count),
        "eval.long_form.algorithms": non_empty(list_of(one_of(*ALGORITHMS))),
        "eval.long_form.max_new_tokens": count,
        "eval.long_form.chunk_length_s": at_most(30, positive),
        "eval.long_form.stride_length_s": optional(non_negative),
        "eval.long_form.batch_size": count,
        "eval.long_form.sequential.batch_size": count,
        "eval.speculative.samples": count,
        "eval.speculative.warmup": non_negative_int,
        "eval.latency.batch_sizes": non_empty(list_of(count)),
        "eval.latency.samples": count,
        "eval.latency.warmup": non_negative_int,
        "eval.latency.repeats": count,
        "eval.noise.types": non_empty(list_of(one_of(*NOISE_TYPES))),
        "eval.noise.snr_db": non_empty(list_of(number)),
        "eval.noise.samples": count,
        "eval.noise.seed": integer,
    },
    # The quantization's values depend on the format: its module checks them (export_formats).
    "export": {"format": one_of(*FORMATS), "quantization": optional(text), "force": boolean, **HUB_RULES},
    "import_model": {},
    "init_student": {"overwrite": boolean},
    "corpus": {
        "sampling_rate": count,
        "shard_size": count,
        "num_workers": count,
        "sentence_pools.*": probability,
        "corpora.*.sizes.*": non_negative_int,
        "corpora.*.rate": positive,
        "corpora.*.tempo": list_of(positive, length=2),
        "corpora.*.pitch": list_of(
            Rule("a number in [0, 99]", lambda v: _is_number(v) and 0 <= v <= 99), length=2
        ),
        "corpora.*.min_duration_s": positive,
        "corpora.*.max_duration_s": positive,
        "corpora.*.pause_s": non_negative,
        "noise.snr_db": optional(number | non_empty(list_of(number))),
        "noise.type": one_of(*NOISE_TYPES) | non_empty(list_of(one_of(*NOISE_TYPES))),
        "noise.splits": list_of(split_name),
    },
    "pipeline": {
        "stages": non_empty(list_of(one_of(*STAGES))),
        "audio_hours": optional(positive),
        "train.wer_threshold": optional(non_negative),
        "train.seed": optional(integer),
        "train.ablation": optional(text),
        "train.export": one_of("auto", "best", "last", "averaged", "ema"),
        "evaluate_teacher": boolean,
        "deploy_formats": list_of(
            Rule("<format>:<quantization> (e.g. ggml:q8_0)", lambda v: isinstance(v, str) and bool(v))
        ),
        "overrides.*": list_of(Rule("an override (key=value)", lambda v: isinstance(v, str))),
        **HUB_RULES,
    },
}


def _matches(pattern: Sequence[str], path: Sequence[str]) -> bool:
    return len(pattern) == len(path) and all(map(fnmatch.fnmatchcase, path, pattern))


def stage_rules(stage: str) -> dict[tuple[str, ...], Rule]:
    """The rules of one command: the shared groups' and its own, keyed by the pattern's parts."""
    return {tuple(key.split(".")): rule for key, rule in {**RULES, **STAGE_RULES[stage]}.items()}


def _check(node: DictConfig | ListConfig, path: list[str], rules: dict, where: str) -> None:
    keys = node.keys() if isinstance(node, DictConfig) else range(len(node))
    for key in keys:
        here = [*path, str(key)]
        # Only the branches that lead to a rule are resolved (an unrelated interpolation is never evaluated).
        if not any(len(p) >= len(here) and _matches(p[: len(here)], here) for p in rules):
            continue
        if OmegaConf.is_missing(node, key):
            continue  # `???`: the command that needs the value names it
        value = node[key]  # an interpolation is resolved here
        rule = next((r for p, r in rules.items() if _matches(p, here)), None)
        if rule is not None:
            plain = OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
            if not rule.ok(plain):
                raise ConfigError(f"{where}{'.'.join(here)} must be {rule.expects}, got {plain!r}")
        if isinstance(value, DictConfig | ListConfig):
            _check(value, here, rules, where)


def _specaugment_without_encoder_cache(cfg: DictConfig) -> str | None:
    """The encoder-output cache stores the encoder outputs of the clean features: masked inputs cannot use it."""
    if OmegaConf.select(cfg, "augment.specaugment.enabled", default=False) and OmegaConf.select(
        cfg, "encoder_cache.enabled", default=False
    ):
        return SPECAUGMENT_WITH_CACHE
    return None


def _push_without_export(cfg: DictConfig) -> str | None:
    """Training uploads its exported student: with export=false there is none."""
    if cfg.get("push_to_hub") and not cfg.get("export", True):
        return f"push_to_hub={cfg.push_to_hub} uploads the run's exported student: it needs export=true"
    return None


# Settings that are each valid but cannot be combined: (stage -> checks returning the one-line error or None).
CROSS_CHECKS: dict[str, list[Callable[[DictConfig], str | None]]] = {
    # (a tracker's package is checked with the settings: logger=wandb without wandb installed)
    "train": [_specaugment_without_encoder_cache, _push_without_export, missing_tracker_package],
}


def validate(cfg: DictConfig, stage: str, where: str = "") -> DictConfig:
    """Check every key of `cfg` (the composed config of command `stage`) that has a rule, before any model or
    dataset loads. Raises `ConfigError` ("<where><key> must be <what it takes>, got <value>") at the first bad
    value; `where` says which of distil-pipeline's stages the config is."""
    _check(cfg, [], stage_rules(stage), where)
    for check in CROSS_CHECKS.get(stage, []):
        problem = check(cfg)
        if problem:
            raise ConfigError(where + problem)
    return cfg
