"""Model directories: a model config resolved to something `from_pretrained` loads (its source, chosen by
`_target_`, lives in distil.whisper.sources), checked, loaded strictly, the tiny random teacher, fingerprints.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from collections.abc import Mapping
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch import nn

from distil.utils.errors import InputError
from distil.utils.io import build_directory, is_complete, write_atomic
from distil.utils.paths import CONF_DIR, models_dir

FINGERPRINT_CACHE = ".distil_fingerprint.json"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def tiny_random_defaults() -> dict:
    """The tiny random teacher's architecture: `random:` of conf/teacher/tiny_random.yaml (the only copy)."""
    from omegaconf import OmegaConf

    return dict(OmegaConf.to_container(OmegaConf.load(CONF_DIR / "teacher" / "tiny_random.yaml").random))


TINY_RANDOM_VERSION = 4
_PROCESSOR_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
    "normalizer.json",
    "preprocessor_config.json",
    "processor_config.json",
)


class ModelConfigError(InputError):
    """A model config that cannot be resolved (unknown source, a key its source does not take, bad path, ...)."""


def resolve_model(model_cfg: Mapping, models_root: str | Path | None = None, force: bool = False) -> str:
    """Return a local Hugging Face directory or Hub id for `model_cfg`, importing/building it on first use.

    `model_cfg` names its source by `_target_` (distil.whisper.sources); `path`, when set, wins. `models_root`
    defaults to `distil.utils.paths.models_dir()` (`$DISTIL_HOME/models`); stages may pass `cfg.paths.models`.
    `force` rebuilds an imported/random model even when its cache is complete.
    """
    from distil.whisper.sources import model_source

    return model_source(model_cfg).resolve(models_root, force=force)


def check_model_path(path: str) -> str:
    """A local directory must hold a model config and a processor; anything else must look like a Hub id."""
    local = Path(path).expanduser()
    if local.exists():
        if not local.is_dir():
            raise ModelConfigError(
                f"model path {local} is a file; point `path` at a Hugging Face model directory"
            )
        if not (local / "config.json").is_file():
            raise ModelConfigError(
                f"model directory {local} has no config.json: `path` must be a directory written by "
                "`save_pretrained` (or `distil-import-model`), or a Hub id like openai/whisper-tiny.en"
            )
        has_features = any(
            (local / f).is_file() for f in ("preprocessor_config.json", "processor_config.json")
        )
        has_tokenizer = any(
            (local / f).is_file() for f in ("tokenizer.json", "vocab.json", "tokenizer_config.json")
        )
        if not (has_features and has_tokenizer):
            raise ModelConfigError(
                f"model directory {local} has no {'feature extractor' if not has_features else 'tokenizer'} "
                "(preprocessor_config.json / tokenizer.json): save the WhisperProcessor into it too "
                "(`processor.save_pretrained(dir)`)"
            )
        check_whisper_directory(local)
        return str(local)
    if path.startswith(("/", ".", "~")) or "\\" in path or not _HUB_ID.match(path):
        raise ModelConfigError(
            f"model path {path!r} does not exist (and is not a Hub id like openai/whisper-tiny.en)"
        )
    return path  # a Hub id; transformers downloads (or finds it in its cache) when loading


def model_dir_name(path: str | None, default: str = "hub") -> str:
    """A model's name for output paths (`pseudo_labels/<name>`): a local directory's own name (never its
    absolute path, which would put the labels inside the model's directory), a Hub id as it is."""
    if not path:
        return default
    text = str(path).rstrip("/")
    if text.startswith(("/", ".", "~")) or Path(text).expanduser().exists():
        return Path(text).expanduser().name
    return text


OmegaConf.register_new_resolver("model_dir_name", model_dir_name, replace=True)


def check_whisper_directory(local: Path) -> None:
    """Refuse, before any work, a directory that is not a whole Whisper model: another architecture, no
    weights, no generation config, or a tokenizer that is not this model's (a foreign vocabulary)."""
    from transformers import AutoTokenizer

    config = json.loads((local / "config.json").read_text())
    if config.get("model_type") != "whisper":
        raise ModelConfigError(
            f"model directory {local} is not a Whisper model (config.json model_type="
            f"{config.get('model_type')!r}); distil distils Whisper: point `path` at a Whisper directory"
        )
    try:
        _weight_files(local)
    except FileNotFoundError as err:
        raise ModelConfigError(str(err)) from err
    if not (local / "generation_config.json").is_file():
        raise ModelConfigError(
            f"model directory {local} has no generation_config.json (Whisper's timestamp and language "
            "tokens live there): copy it from the model this one was made from "
            "(`GenerationConfig.from_pretrained(src).save_pretrained(dir)`)"
        )
    tokenizer = AutoTokenizer.from_pretrained(str(local))
    sot = tokenizer.convert_tokens_to_ids("<|startoftranscript|>")
    if sot != config.get("decoder_start_token_id") or len(tokenizer) > int(config.get("vocab_size", 0)):
        raise ModelConfigError(
            f"the tokenizer in {local} does not belong to its model (<|startoftranscript|> = {sot}, "
            f"{len(tokenizer)} tokens; config.json: decoder_start_token_id="
            f"{config.get('decoder_start_token_id')}, vocab_size={config.get('vocab_size')}): save the "
            "model's own WhisperProcessor into the directory"
        )


def load_whisper(path: str, dropout: float | None = None, **kwargs):
    """`WhisperForConditionalGeneration.from_pretrained` that fails on any missing or unexpected weight:
    transformers would otherwise initialise the missing ones at random and go on."""
    from transformers import WhisperForConditionalGeneration

    if dropout is not None:
        kwargs |= {
            "dropout": float(dropout),
            "attention_dropout": float(dropout),
            "activation_dropout": float(dropout),
        }
    kwargs.setdefault("dtype", torch.float32)
    model, info = WhisperForConditionalGeneration.from_pretrained(path, output_loading_info=True, **kwargs)
    problems = {k: v for k in ("missing_keys", "unexpected_keys", "mismatched_keys") if (v := info.get(k))}
    if problems:
        detail = "; ".join(f"{k.replace('_', ' ')}: {sorted(map(str, v))[:5]}" for k, v in problems.items())
        raise ModelConfigError(
            f"the weights in {path} do not fit its Whisper config ({detail}): the directory is damaged or "
            "holds another model; re-export or re-download it"
        )
    return model


# --------------------------------------------------------------------------------------------------
# Tiny random teacher
# --------------------------------------------------------------------------------------------------


def tiny_random_spec(overrides: Mapping | None = None) -> dict:
    spec = tiny_random_defaults()
    unknown = set(overrides or {}) - set(spec)
    if unknown:
        raise ModelConfigError(f"unknown tiny random model keys {sorted(unknown)}; valid: {sorted(spec)}")
    spec.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return spec


def build_tiny_random(
    name: str, overrides: Mapping | None = None, models_root: str | Path | None = None, force: bool = False
) -> Path:
    """A few-MB random-weight Whisper with the real tiny.en vocabulary and processor; seeded, cached."""
    root = Path(models_root).expanduser() if models_root is not None else models_dir()
    spec = tiny_random_spec(overrides)
    base_dir = Path(resolve_model(_base_model_cfg(spec["base"]), root))
    marker_spec = {
        "builder": "distil.whisper.models.build_tiny_random",
        "version": TINY_RANDOM_VERSION,
        **spec,
    }
    out = root / name
    if not force and is_complete(out, marker_spec):
        return out
    return build_directory(
        out, marker_spec, lambda tmp: _write_tiny_random(spec, base_dir, tmp), replace=force
    )


def _base_model_cfg(base: str) -> dict:
    from omegaconf import OmegaConf

    path = CONF_DIR / "teacher" / f"{base}.yaml"
    if not path.is_file():
        raise ModelConfigError(f"tiny random model base {base!r}: no config {path}")
    return OmegaConf.to_container(OmegaConf.load(path), resolve=True)


def _write_tiny_random(spec: dict, base_dir: Path, out: Path) -> None:
    from transformers import GenerationConfig, WhisperConfig, WhisperForConditionalGeneration

    base = WhisperConfig.from_pretrained(base_dir)
    heads = spec["attention_heads"]
    config = WhisperConfig(
        vocab_size=base.vocab_size,
        num_mel_bins=base.num_mel_bins,
        d_model=spec["d_model"],
        encoder_layers=spec["encoder_layers"],
        decoder_layers=spec["decoder_layers"],
        encoder_attention_heads=heads,
        decoder_attention_heads=heads,
        encoder_ffn_dim=spec["ffn_dim"],
        decoder_ffn_dim=spec["ffn_dim"],
        # Positions must stay Whisper's: 30 s of features -> 1500 encoder frames, 448 decoder tokens.
        max_source_positions=base.max_source_positions,
        max_target_positions=base.max_target_positions,
        bos_token_id=base.bos_token_id,
        eos_token_id=base.eos_token_id,
        pad_token_id=base.pad_token_id,
        decoder_start_token_id=base.decoder_start_token_id,
        suppress_tokens=base.suppress_tokens,
        begin_suppress_tokens=base.begin_suppress_tokens,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(spec["seed"]))
        model = WhisperForConditionalGeneration(config)
        if spec.get("eot_after") is not None:
            _bias_towards_eot(model, int(spec["eot_after"]))
    generation_config = GenerationConfig.from_pretrained(base_dir)
    # Alignment heads must exist in this smaller decoder: use every head of the last layer.
    generation_config.alignment_heads = [[spec["decoder_layers"] - 1, h] for h in range(heads)]
    model.generation_config = generation_config
    model.save_pretrained(out)
    for f in _PROCESSOR_FILES:
        if (base_dir / f).is_file():
            shutil.copy2(base_dir / f, out / f)


def _bias_towards_eot(model, position: int, strength: float = 3.0) -> None:
    """Make <|endoftext|> the greedy choice from decoder position `position` on (`eot_after` in conf/teacher/tiny_random.yaml).

    The final layer norm maps a residual stream dominated by a unit vector u to ~sqrt(d_model) * u, so with u
    along a lengthened <|endoftext|> embedding (tied to the output projection) its logit stands well above
    the random ones; earlier positions are untouched, so the first tokens stay random.
    """
    decoder = model.model.decoder
    embed, eot = decoder.embed_tokens.weight, model.config.eos_token_id
    with torch.no_grad():
        # <|endoftext|> is also the padding index, whose row nn.Embedding initialises to zeros.
        u = torch.randn(embed.shape[1])
        u /= u.norm()
        # In float64: a float32 mean over 51k rows rounds differently with the number of threads, and the
        # same seed must give the same bytes in every process.
        mean_norm = embed.double().norm(dim=1).mean().float()
        embed[eot] = u * strength * mean_norm
        decoder.embed_positions.weight[position:] += u


# --------------------------------------------------------------------------------------------------
# Fingerprints (provenance of pseudo-labels)
# --------------------------------------------------------------------------------------------------


def _weight_files(model_dir: Path) -> list[Path]:
    files = sorted(model_dir.glob("*.safetensors")) or sorted(model_dir.glob("pytorch_model*.bin"))
    if not files:
        raise FileNotFoundError(
            f"no weights (*.safetensors or pytorch_model*.bin) in model directory {model_dir}"
        )
    return files


def model_fingerprint(model_dir: str | Path) -> str:
    """`sha256:<hex>` over the weight file(s) of a local model directory, cached in the directory.

    The cache is keyed by file names, sizes and modification times, so rewritten weights are re-hashed. A Hub
    id (no local directory) fingerprints as `hub:<id>`: the weights are not here to hash.
    """
    d = Path(model_dir).expanduser()
    if not d.is_dir():
        return f"hub:{model_dir}"
    files = _weight_files(d)
    key = [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files]
    cache = d / FINGERPRINT_CACHE
    try:
        cached = json.loads(cache.read_text())
        if cached.get("files") == key:
            return cached["fingerprint"]
    except (OSError, ValueError, KeyError, AttributeError):
        pass
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode() + b"\0")
        with open(f, "rb") as fh:
            while chunk := fh.read(1 << 22):
                h.update(chunk)
    fingerprint = "sha256:" + h.hexdigest()
    try:  # a read-only model directory still gets its fingerprint, just not cached
        write_atomic(cache, json.dumps({"files": key, "fingerprint": fingerprint}) + "\n")
    except OSError:
        pass
    return fingerprint


def same_weights(a: nn.Module, b: nn.Module) -> bool:
    """True if two modules have the same parameter/buffer names, shapes and values (exact)."""
    sa, sb = a.state_dict(), b.state_dict()
    if sa.keys() != sb.keys():
        return False
    return all(sa[k].shape == sb[k].shape and torch.equal(sa[k].cpu(), sb[k].cpu()) for k in sa)


def weights_fingerprint(module: nn.Module) -> str:
    """sha256 over a module's tensors (names, shapes, values): identity of e.g. a frozen encoder."""
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().to("cpu", torch.float32).contiguous()
        h.update(f"{name}:{tuple(t.shape)}".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()[:16]
