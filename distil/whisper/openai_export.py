"""Export a Hugging Face Whisper directory as the checkpoint the `openai-whisper` package loads
(`whisper.load_model("<out>/model.pt")`).

`out/model.pt` is what openai-whisper's own checkpoints are: a `torch.save`d dict

    {"dims": {n_mels, n_audio_ctx, n_audio_state, n_audio_head, n_audio_layer,
              n_vocab, n_text_ctx, n_text_state, n_text_head, n_text_layer},   # whisper.model.ModelDimensions
     "model_state_dict": {openai name: tensor}}                                # float32 or float16

with the Hugging Face weights renamed to openai's modules (`openai_name`: `model.encoder.layers.0.self_attn.
q_proj.weight` -> `encoder.blocks.0.attn.query.weight`, ...). `proj_out.weight` is not written: openai's decoder
projects onto its token embedding, so the model's output projection must be tied to it (checked). Beside it:
the source's config, tokenizer, feature extractor and generation files (distil evaluates from them) and
distil_export.json. openai-whisper hard-codes more than the checkpoint says (MLP width 4 x d_model, the
tokenizer's special-token ids of Whisper's own vocabularies, mel filters for 80 and 128 bins only):
`check_model` refuses what it cannot run, before anything is written.
"""

from __future__ import annotations

import logging
from pathlib import Path

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

log = logging.getLogger(__name__)

EXPORT_FORMAT = "openai-whisper"
EXPORT_FORMAT_VERSION = 1
CHECKPOINT = "model.pt"
QUANTIZATIONS = ("float32", "float16")  # the checkpoint's weight dtype; openai's own checkpoints are float16
# Whisper's own vocabularies: English-only, multilingual (99 languages), large-v3 (100). openai-whisper's
# tokenizer (and whisper.cpp's) derives every special token's id from the vocabulary size, so no other runs.
WHISPER_VOCAB_SIZES = (51864, 51865, 51866)
MEL_BINS = (80, 128)  # the mel filter banks openai-whisper ships (assets/mel_filters.npz)

# Hugging Face module names -> openai-whisper's (the same renames whisper.cpp's convert-h5-to-ggml.py makes).
_LAYER_RENAMES = {
    "self_attn.q_proj": "attn.query",
    "self_attn.k_proj": "attn.key",
    "self_attn.v_proj": "attn.value",
    "self_attn.out_proj": "attn.out",
    "self_attn_layer_norm": "attn_ln",
    "encoder_attn.q_proj": "cross_attn.query",
    "encoder_attn.k_proj": "cross_attn.key",
    "encoder_attn.v_proj": "cross_attn.value",
    "encoder_attn.out_proj": "cross_attn.out",
    "encoder_attn_layer_norm": "cross_attn_ln",
    "fc1": "mlp.0",
    "fc2": "mlp.2",
    "final_layer_norm": "mlp_ln",
}
_TOP_RENAMES = {
    "encoder.layer_norm": "encoder.ln_post",
    "decoder.layer_norm": "decoder.ln",
    "encoder.embed_positions": "encoder.positional_embedding",
    "decoder.embed_positions": "decoder.positional_embedding",
    "decoder.embed_tokens": "decoder.token_embedding",
}


def openai_name(hf_name: str) -> str | None:
    """openai-whisper's name for a Hugging Face Whisper weight; None for the tied output projection."""
    if hf_name == "proj_out.weight":
        return None
    name = hf_name.removeprefix("model.")
    module, _, param = name.rpartition(".")
    parts = module.split(".")
    if len(parts) >= 3 and parts[1] == "layers":  # encoder.layers.<i>.<module>
        stack, index, inner = parts[0], parts[2], ".".join(parts[3:])
        return f"{stack}.blocks.{index}.{_LAYER_RENAMES[inner]}.{param}"
    if module in _TOP_RENAMES:
        renamed = _TOP_RENAMES[module]
        # openai's positional embeddings are bare tensors (no `.weight`), its token embedding a module
        return renamed if renamed.endswith("positional_embedding") else f"{renamed}.{param}"
    return name  # encoder.conv1.weight, encoder.conv2.bias, ...


def dims(config: dict) -> dict[str, int]:
    """openai-whisper's ModelDimensions of a Hugging Face Whisper config.json."""
    return {
        "n_mels": config["num_mel_bins"],
        "n_audio_ctx": config["max_source_positions"],
        "n_audio_state": config["d_model"],
        "n_audio_head": config["encoder_attention_heads"],
        "n_audio_layer": config["encoder_layers"],
        "n_vocab": config["vocab_size"],
        "n_text_ctx": config["max_target_positions"],
        "n_text_state": config["d_model"],
        "n_text_head": config["decoder_attention_heads"],
        "n_text_layer": config["decoder_layers"],
    }


def check_openai_architecture(config: dict, where: Path, target: str) -> None:
    """What openai-whisper's model (and whisper.cpp, built on the same design) hard-codes: refused in one line."""
    if config["vocab_size"] not in WHISPER_VOCAB_SIZES:
        raise ExportInputError(
            f"{where}: vocab_size {config['vocab_size']} is not one of Whisper's own vocabularies "
            f"{list(WHISPER_VOCAB_SIZES)}, and {target} derives every special token's id from that size: "
            "only a model with a standard Whisper tokenizer exports to it"
        )
    if config["num_mel_bins"] not in MEL_BINS:
        raise ExportInputError(
            f"{where}: num_mel_bins {config['num_mel_bins']} is not {' or '.join(map(str, MEL_BINS))}, "
            f"the mel filter banks {target} has: it cannot compute this model's input features"
        )
    widths = {config["encoder_ffn_dim"], config["decoder_ffn_dim"]}
    if widths != {4 * config["d_model"]}:
        raise ExportInputError(
            f"{where}: feed-forward width {sorted(widths)} is not 4 x d_model ({4 * config['d_model']}), which "
            f"{target} hard-codes: it cannot hold this model"
        )
    if config.get("tie_word_embeddings") is False:
        raise ExportInputError(
            f"{where}: the output projection is not tied to the token embedding (tie_word_embeddings false), "
            f"and {target} projects onto the token embedding: it cannot hold this model"
        )
    if config.get("scale_embedding") or config.get("activation_function", "gelu") != "gelu":
        raise ExportInputError(
            f"{where}: scale_embedding={config.get('scale_embedding')} / activation_function="
            f"{config.get('activation_function')!r} differ from Whisper's (false / 'gelu'), which {target} "
            "hard-codes: it would compute another model"
        )


def check_quantization(quantization: str) -> None:
    if quantization not in QUANTIZATIONS:
        raise ExportInputError(
            f"quantization={quantization!r} is not an openai-whisper checkpoint dtype: use one of {list(QUANTIZATIONS)}"
        )


def check_model(source: Path) -> None:
    """`source` must be a Hugging Face Whisper directory whose architecture openai-whisper's model can hold."""
    source = check_whisper_dir(source, "openai-whisper")
    check_openai_architecture(read_json(source / "config.json"), source, "openai-whisper")


def export(source: Path, out: Path, quantization: str, force: bool = False) -> Path:
    """Write `source` into `out` as `model.pt` for `whisper.load_model`, with `quantization` weights and the
    files distil evaluates from; the same source and quantisation already there is kept as it is."""
    check_quantization(quantization)
    source = Path(source).expanduser()
    check_model(source)
    out = Path(out).expanduser()
    check_output(out, EXPORT_FORMAT, "an openai-whisper")
    spec = export_spec(source, quantization, EXPORT_FORMAT, EXPORT_FORMAT_VERSION)
    return write_export(out, spec, lambda tmp: _convert(source, tmp, quantization, spec), force, source)


def state_dict(source: Path, dtype) -> dict:
    """The source's weights under openai-whisper's names, as contiguous `dtype` tensors."""
    from transformers import WhisperForConditionalGeneration

    model = WhisperForConditionalGeneration.from_pretrained(source)
    renamed = {}
    for hf_name, tensor in model.state_dict().items():
        name = openai_name(hf_name)
        if name is not None:
            renamed[name] = tensor.detach().to(dtype).contiguous().clone()
    return renamed


def _convert(source: Path, tmp: Path, quantization: str, spec: dict) -> None:
    import torch

    log.info("converting %s to an openai-whisper checkpoint (%s) ...", source, quantization)
    checkpoint = {
        "dims": dims(read_json(source / "config.json")),
        "model_state_dict": state_dict(source, getattr(torch, quantization)),
    }
    torch.save(checkpoint, tmp / CHECKPOINT)
    copy_evaluation_files(source, tmp)
    versions = {}
    try:  # load it where it will run, so an export openai-whisper rejects never appears complete
        import whisper

        whisper.load_model(str(tmp / CHECKPOINT), device="cpu")
        versions["openai-whisper"] = whisper.__version__
    except ImportError:
        log.warning("openai-whisper is not installed: %s was not loaded to check it", tmp / CHECKPOINT)
    write_json_atomic(
        tmp / EXPORT_INFO,
        {
            "source": str(source),
            "source_fingerprint": spec["source_fingerprint"],
            "quantization": quantization,
            "format": EXPORT_FORMAT,
            "checkpoint": CHECKPOINT,
            **versions,
        },
    )
