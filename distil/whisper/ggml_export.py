"""Export a Hugging Face Whisper directory as the single-file GGML model whisper.cpp runs (`out/ggml-model.bin`).

The file is what whisper.cpp's own converter (models/convert-h5-to-ggml.py) writes and its loader
(`whisper_model_load` in src/whisper.cpp) reads, little-endian, in this order:

1. magic `0x67676d6c` ("ggml"), int32;
2. hyper-parameters, 11 x int32: n_vocab, n_audio_ctx, n_audio_state, n_audio_head, n_audio_layer, n_text_ctx,
   n_text_state, n_text_head, n_text_layer, n_mels, ftype. ftype is ggml's file type (0 f32, 1 f16, 7 q8_0,
   8 q5_0; 0 = f32 is not offered, see QUANTIZATIONS) plus 1000 x the quantisation version (2) for the quantised types, as whisper.cpp's quantize tool
   writes it (q8_0 = 2007);
3. mel filters: int32 n_mel, int32 n_fft (201 bins), then n_mel x n_fft float32, row by mel bin: the source's
   own WhisperFeatureExtractor filters, transposed (they equal openai-whisper's assets/mel_filters.npz);
4. vocabulary: int32 count, then per token id 0..count-1 an int32 length and the token's bytes (the byte-level
   BPE token decoded back to bytes, GPT-2's byte table). Only the BPE vocabulary is written: whisper.cpp names
   the special tokens itself from n_vocab;
5. tensors until the end of the file: int32 n_dims, int32 name length, int32 ggml type, n_dims x int32 sizes
   (innermost first, the reverse of numpy's shape), the name (openai-whisper's, `openai_export.openai_name`),
   then the data. Biases, layer norms, positional embeddings and the conv biases (shaped [n, 1]) are float32;
   the conv weights float16; every other 2-D weight (attention, MLP, token embedding)
   is the file's type. `proj_out.weight` is not written: whisper.cpp projects onto the token embedding.

q8_0 and q5_0 are ggml's block formats, written here by `quantize_q8_0` / `quantize_q5_0`, byte for byte what
ggml's reference quantisers (`quantize_row_q8_0_ref`, `quantize_row_q5_0_ref`) produce; whisper.cpp's quantize
tool leaves the same tensors unquantised (conv weights and biases, positional embeddings) as this export.
whisper.cpp hard-codes what the file does not say (special-token ids from n_vocab, MLP width 4 x n_state):
`check_model` refuses a model it cannot run, before anything is written.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import struct
from pathlib import Path
from typing import BinaryIO

import numpy as np

from distil.utils.io import read_json, write_json_atomic
from distil.whisper.ct2_export import (
    EXPORT_INFO,
    ExportInputError,
    check_output,
    check_whisper_dir,
    copy_evaluation_files,
    export_spec,
    write_export,
)
from distil.whisper.openai_export import check_openai_architecture, openai_name

log = logging.getLogger(__name__)

EXPORT_FORMAT = "ggml"
EXPORT_FORMAT_VERSION = 1
MODEL_FILE = "ggml-model.bin"
# No f32: whisper.cpp's converter can write an all-float32 file, but the whisper.cpp pywhispercpp 1.5.1 ships
# aborts running one (GGML_ASSERT(src0->type == GGML_TYPE_F16) in its CPU ops, measured with tiny.en).
QUANTIZATIONS = ("f16", "q8_0", "q5_0")
MAGIC = 0x67676D6C
QNT_VERSION, QNT_VERSION_FACTOR = 2, 1000  # ggml.h GGML_QNT_VERSION, GGML_QNT_VERSION_FACTOR
# quantization -> (ggml file type `ftype`, ggml tensor type of the big 2-D weights)
FTYPES = {"f16": (1, 1), "q8_0": (7, 8), "q5_0": (8, 6)}
GGML_F32, GGML_F16 = 0, 1
BLOCK = 32  # values per q8_0 / q5_0 block (QK8_0, QK5_0)
# Kept in float32 by whisper.cpp's loader whatever the file type (and by its quantize tool).
FLOAT32_TENSORS = {
    "encoder.conv1.bias",
    "encoder.conv2.bias",
    "encoder.positional_embedding",
    "decoder.positional_embedding",
}

# ggml's block layouts (ggml-common.h): a float16 scale, then the quants.
Q8_0 = np.dtype([("d", "<f2"), ("qs", "i1", BLOCK)])
Q5_0 = np.dtype([("d", "<f2"), ("qh", "<u4"), ("qs", "u1", BLOCK // 2)])


def check_quantization(quantization: str) -> None:
    if quantization not in QUANTIZATIONS:
        raise ExportInputError(
            f"quantization={quantization!r} is not a whisper.cpp weight type this export writes: use one of "
            f"{list(QUANTIZATIONS)}"
        )


def check_model(source: Path) -> None:
    """`source` must be a Hugging Face Whisper directory whisper.cpp can run: Whisper's own vocabulary and
    architecture, a byte-level BPE vocabulary with ids 0..n-1."""
    source = check_whisper_dir(source, "whisper.cpp")
    check_openai_architecture(read_json(source / "config.json"), source, "whisper.cpp")
    vocabulary(source)


def check_widths(config: dict, quantization: str, where: Path) -> None:
    """Block quantisation packs each weight row in blocks of 32 values: every row length must divide."""
    if quantization in ("q8_0", "q5_0") and config["d_model"] % BLOCK:
        raise ExportInputError(
            f"{where}: d_model {config['d_model']} is not a multiple of {BLOCK}, so its weight rows cannot be "
            f"stored as {quantization} blocks of {BLOCK}: export it with quantization=f16"
        )


def export(source: Path, out: Path, quantization: str, force: bool = False) -> Path:
    """Write `source` into `out` as `ggml-model.bin` with `quantization` weights, beside the files distil
    evaluates from; the same source and quantisation already there is kept as it is."""
    check_quantization(quantization)
    source = Path(source).expanduser()
    check_model(source)
    check_widths(read_json(source / "config.json"), quantization, source)
    out = Path(out).expanduser()
    check_output(out, EXPORT_FORMAT, "a whisper.cpp (GGML)")
    spec = export_spec(source, quantization, EXPORT_FORMAT, EXPORT_FORMAT_VERSION)
    return write_export(out, spec, lambda tmp: _convert(source, tmp, quantization, spec), force, source)


# --------------------------------------------------------------------------------------------------
# the file's parts
# --------------------------------------------------------------------------------------------------


def byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level BPE table inverted: the character each byte is written as -> the byte."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:  # bytes the BPE cannot show as themselves are shifted past 255
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


def vocabulary(source: Path) -> list[bytes]:
    """The BPE vocabulary of the source's tokenizer.json as bytes, by id (convert-h5-to-ggml.py's vocab.json)."""
    where = source / "tokenizer.json"
    model = json.loads(where.read_text()).get("model") or {}
    vocab = model.get("vocab")
    if model.get("type") != "BPE" or not isinstance(vocab, dict):
        raise ExportInputError(
            f"{where} holds no byte-level BPE vocabulary (model.type {model.get('type')!r}): whisper.cpp reads "
            "Whisper's GPT-2 style vocabulary only"
        )
    if sorted(vocab.values()) != list(range(len(vocab))):
        raise ExportInputError(f"{where}: the BPE vocabulary's ids are not 0..{len(vocab) - 1} without gaps")
    table = byte_decoder()
    tokens = sorted(vocab, key=vocab.get)
    try:
        return [bytes(table[c] for c in token) for token in tokens]
    except KeyError as err:
        raise ExportInputError(
            f"{where}: token characters outside the byte-level table ({err}): not Whisper's vocabulary"
        ) from None


def mel_filters(source: Path) -> np.ndarray:
    """The feature extractor's mel filters as whisper.cpp wants them: float32 [n_mels, n_fft // 2 + 1]."""
    from transformers import WhisperFeatureExtractor

    return np.ascontiguousarray(
        WhisperFeatureExtractor.from_pretrained(source).mel_filters.T, dtype=np.float32
    )


def quantize_q8_0(x: np.ndarray) -> np.ndarray:
    """ggml's q8_0 of float32 rows (length a multiple of 32): per block d = max|x| / 127, q = round(x / d)."""
    blocks = x.astype(np.float32).reshape(-1, BLOCK)
    d = np.abs(blocks).max(axis=1) / np.float32(127)
    inv = np.divide(np.float32(1), d, out=np.zeros_like(d), where=d != 0)
    scaled = blocks * inv[:, None]
    out = np.empty(len(blocks), Q8_0)
    out["d"] = d  # float32 -> float16 rounds to nearest even, as GGML_FP32_TO_FP16
    out["qs"] = _round_half_away(scaled)
    return out


def quantize_q5_0(x: np.ndarray) -> np.ndarray:
    """ggml's q5_0 of float32 rows: per block d = -(the value of largest magnitude) / 16, 5-bit q = x / d + 16
    (rounded, at most 31); the low 4 bits of values j and j+16 share byte j, the 5th bits fill a uint32."""
    blocks = x.astype(np.float32).reshape(-1, BLOCK)
    rows = np.arange(len(blocks))
    extreme = blocks[rows, np.abs(blocks).argmax(axis=1)]  # first of equal magnitudes, as ggml's strict `<`
    d = extreme / np.float32(-16)
    inv = np.divide(np.float32(1), d, out=np.zeros_like(d), where=d != 0)
    q = np.minimum(31, np.trunc(blocks * inv[:, None] + np.float32(16.5))).astype(np.uint8)
    out = np.empty(len(blocks), Q5_0)
    out["d"] = d
    out["qs"] = (q[:, : BLOCK // 2] & 0x0F) | ((q[:, BLOCK // 2 :] & 0x0F) << 4)
    out["qh"] = (((q >> 4) & 1).astype(np.uint32) << np.arange(BLOCK, dtype=np.uint32)).sum(
        axis=1, dtype=np.uint32
    )
    return out


def _round_half_away(x: np.ndarray) -> np.ndarray:
    """C's roundf (halves away from zero; numpy rounds them to even), exactly: x - trunc(x) is exact in float."""
    whole = np.trunc(x)
    return (whole + np.sign(x) * (np.abs(x - whole) >= 0.5)).astype(np.int8)


def tensor_bytes(name: str, value: np.ndarray, quantization: str) -> tuple[int, np.ndarray]:
    """The ggml type and data of one tensor in a `quantization` file (see the module docstring)."""
    wtype = FTYPES[quantization][1]
    if value.ndim < 2 or name in FLOAT32_TENSORS:
        return GGML_F32, value.astype(np.float32)
    if value.ndim == 3 or wtype == GGML_F16:  # the conv weights stay float16 in a quantised file
        return GGML_F16, value.astype(np.float16)
    return wtype, (quantize_q8_0 if quantization == "q8_0" else quantize_q5_0)(value)


def write_tensor(f: BinaryIO, name: str, value: np.ndarray, quantization: str) -> None:
    if name in ("encoder.conv1.bias", "encoder.conv2.bias"):
        value = value.reshape(-1, 1)  # whisper.cpp adds them to [n_ctx, n_state] rows as [1, n_state] tensors
    ttype, data = tensor_bytes(name, value, quantization)
    encoded = name.encode()
    f.write(struct.pack("<iii", value.ndim, len(encoded), ttype))
    f.write(struct.pack(f"<{value.ndim}i", *reversed(value.shape)))
    f.write(encoded)
    f.write(np.ascontiguousarray(data).tobytes())


def write_model(f: BinaryIO, source: Path, quantization: str) -> int:
    """Write the whole GGML file for `source`; returns how many tensors it holds."""
    from transformers import WhisperForConditionalGeneration

    from distil.whisper.openai_export import dims

    ftype, wtype = FTYPES[quantization]
    if wtype != GGML_F16:
        ftype += QNT_VERSION * QNT_VERSION_FACTOR
    d = dims(read_json(source / "config.json"))
    header = [d[k] for k in ("n_vocab", "n_audio_ctx", "n_audio_state", "n_audio_head", "n_audio_layer")]
    header += [d[k] for k in ("n_text_ctx", "n_text_state", "n_text_head", "n_text_layer", "n_mels")]
    f.write(struct.pack("<12i", MAGIC, *header, ftype))
    filters = mel_filters(source)
    f.write(struct.pack("<ii", *filters.shape))
    f.write(filters.tobytes())
    tokens = vocabulary(source)
    f.write(struct.pack("<i", len(tokens)))
    for token in tokens:
        f.write(struct.pack("<i", len(token)) + token)
    model = WhisperForConditionalGeneration.from_pretrained(source)
    written = 0
    for hf_name, tensor in model.state_dict().items():
        name = openai_name(hf_name)
        if name is not None:
            write_tensor(f, name, tensor.detach().float().numpy(), quantization)
            written += 1
    return written


def _convert(source: Path, tmp: Path, quantization: str, spec: dict) -> None:
    log.info("converting %s to whisper.cpp's GGML format (%s) ...", source, quantization)
    with open(tmp / MODEL_FILE, "wb") as f:
        tensors = write_model(f, source, quantization)
    copy_evaluation_files(source, tmp)
    versions = {}
    try:  # load it where it will run, so a file whisper.cpp rejects never appears complete
        check_loads(tmp / MODEL_FILE)
        versions["pywhispercpp"] = importlib.metadata.version("pywhispercpp")
    except ImportError:
        log.warning("pywhispercpp is not installed: %s was not loaded to check it", tmp / MODEL_FILE)
    write_json_atomic(
        tmp / EXPORT_INFO,
        {
            "source": str(source),
            "source_fingerprint": spec["source_fingerprint"],
            "quantization": quantization,
            "format": EXPORT_FORMAT,
            "model_file": MODEL_FILE,
            "tensors": tensors,
            **versions,
        },
    )


def check_loads(path: Path) -> None:
    """Load `path` with whisper.cpp (through pywhispercpp's binding); a file it rejects is an error."""
    import _pywhispercpp as pw

    ctx = pw.whisper_init_from_file_with_params(str(path), pw.whisper_context_default_params())
    if ctx is None:
        raise RuntimeError(f"whisper.cpp could not load {path} (its log above says why)")
    pw.whisper_free(ctx)
