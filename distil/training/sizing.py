"""Sizing a job before it is queued: GPU memory per device, disk for labels and the encoder cache, tokens and steps.

Pure arithmetic on the model dimensions (distil.whisper.dimensions: shipped for the standard checkpoints, so no
weights and no network are needed) and the stage config. The numbers are estimates of the largest terms, not a
measurement: they leave out allocator fragmentation and kernels' scratch space, so plan for some headroom. Each
term is reported, with the assumptions it rests on, so a user can see what to change when it does not fit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from distil.whisper.dimensions import MAX_SOURCE_POSITIONS, MAX_TARGET_POSITIONS, WhisperDimensions

GIB = 1024**3
OVERHEAD_GIB = 1.0  # CUDA context, cuBLAS/cuDNN workspaces, the allocator's slack
TOKENS_PER_SECOND = 3.0  # label tokens per second of English speech (~2.5 words/s, with timestamps)
MEAN_CLIP_SECONDS = 10.0  # the length of an unpacked clip, for per-hour figures (packing: its max_seconds)
LOGIT_BYTES = 16  # per label position and vocabulary entry: student logits + their gradient, teacher logits,
# and one fp32 (log-)softmax buffer of the KL
LABEL_BYTES_PER_TOKEN = 8  # stored label: its int32 token id and ~4 bytes of text
LABEL_BYTES_PER_ROW = 200  # id, source, pl_wer, duration, parquet overhead
ASSUMPTIONS = [
    "activations in bf16 (2 bytes) under a mixed/half precision, fp32 otherwise; weights and AdamW states fp32",
    f"the worst batch: every label at data.max_label_length (capped at {MAX_TARGET_POSITIONS} positions)",
    f"{LOGIT_BYTES} bytes per logit entry (student logits and gradient, teacher logits, a softmax buffer)",
    f"{TOKENS_PER_SECOND:g} label tokens per second of speech",
    f"{OVERHEAD_GIB:g} GiB for the CUDA context and workspaces; fragmentation not included",
]
LABELLING_ASSUMPTIONS = [
    "weights, key/value cache and activations in the labelling dtype; every label runs to max_new_tokens",
    f"{TOKENS_PER_SECOND:g} label tokens per second of speech; unpacked clips of {MEAN_CLIP_SECONDS:g} s on average",
    f"{OVERHEAD_GIB:g} GiB for the CUDA context and workspaces; fragmentation not included",
]
MIB = 1024**2


@dataclass(frozen=True)
class StudentShape:
    encoder_layers: int  # the student's own encoder layers (all of them when it keeps the teacher's)
    decoder_layers: int
    shares_encoder: bool  # the teacher's frozen encoder, run once for both models
    freeze_embed_tokens: bool = False
    freeze_embed_positions: bool = False


def activation_bytes(precision: Any) -> int:
    text = str(precision)
    return 2 if ("16" in text and "32" not in text) or "mixed" in text else 4


def _gib(n_bytes: float) -> float:
    return round(n_bytes / GIB, 1)


def parameters(teacher: WhisperDimensions, student: StudentShape) -> dict[str, int]:
    """Parameter counts: the teacher's, the student's, and those the optimiser updates."""
    student_decoder = teacher.decoder_parameters(student.decoder_layers)
    student_encoder = (
        teacher.encoder_parameters() if student.shares_encoder else _encoder_of(teacher, student)
    )
    trainable = student_decoder
    if student.freeze_embed_tokens:
        trainable -= teacher.vocab_size * teacher.d_model
    if student.freeze_embed_positions:
        trainable -= MAX_TARGET_POSITIONS * teacher.d_model
    if not student.shares_encoder:
        trainable += student_encoder
    return {
        "teacher": teacher.encoder_parameters() + teacher.decoder_parameters(),
        "student": student_encoder + student_decoder,
        "trainable": trainable,
    }


def _encoder_of(teacher: WhisperDimensions, student: StudentShape) -> int:
    layers = WhisperDimensions(**{**teacher.__dict__, "encoder_layers": student.encoder_layers})
    return layers.encoder_parameters()


def training_memory(
    teacher: WhisperDimensions,
    student: StudentShape,
    batch_size: int,
    label_tokens: int,
    precision: Any,
    encoder_cached: bool = False,
) -> dict[str, float]:
    """GiB per device of one training step, by term. `label_tokens`: decoder positions of the longest label."""
    act = activation_bytes(precision)
    d, f, v = teacher.d_model, teacher.ffn_dim, teacher.vocab_size
    counts = parameters(teacher, student)
    # Both models' weights, the teacher's encoder once when the student shares it.
    weights = counts["teacher"] + counts["student"]
    if student.shares_encoder:
        weights -= teacher.encoder_parameters()
    frames = batch_size * MAX_SOURCE_POSITIONS
    tokens = batch_size * min(label_tokens, MAX_TARGET_POSITIONS)
    # The encoder output (fp32, read by both decoders), plus the widest encoder activation while it runs (not
    # when cached); a trained encoder keeps each layer's activations for the backward pass.
    encoder = frames * d * 4
    if not encoder_cached:
        encoder += frames * f * act
    if not student.shares_encoder:
        encoder += frames * student.encoder_layers * (12 * d + 2 * f) * act
    # Each trained decoder layer keeps its cross-attention keys/values and its activations for backward.
    decoder = student.decoder_layers * (frames * 2 * d * act + tokens * (12 * d + 2 * f) * act)
    terms = {
        "weights": weights * 4,
        "gradients_and_optimizer": counts["trainable"] * 12,  # fp32 gradient + AdamW's two moments
        "logits": tokens * v * LOGIT_BYTES,
        "encoder": encoder,
        "decoder": decoder,
    }
    return _memory_table(terms)


def labelling_memory(
    teacher: WhisperDimensions, batch_size: int, max_new_tokens: int, dtype: str
) -> dict[str, float]:
    """GiB per device of the teacher generating labels: weights, the key/value cache, encoder and logits."""
    wbytes = 4 if str(dtype) in ("fp32", "float32") else 2
    d, f = teacher.d_model, teacher.ffn_dim
    positions = min(MAX_TARGET_POSITIONS, max_new_tokens + 4)  # the prompt's tokens too
    kv_cache = batch_size * teacher.decoder_layers * 2 * (positions + MAX_SOURCE_POSITIONS) * d * wbytes
    terms = {
        "weights": (teacher.encoder_parameters() + teacher.decoder_parameters()) * wbytes,
        "kv_cache": kv_cache,
        "encoder": batch_size * MAX_SOURCE_POSITIONS * (d + f) * wbytes,
        "logits": batch_size * teacher.vocab_size * 4 * 2,  # the step's logits and their fp32 scores
    }
    return _memory_table(terms)


def _memory_table(terms: dict[str, float]) -> dict[str, float]:
    """Each term's bytes in GiB, the fixed overhead, and their total."""
    out = {k: _gib(b) for k, b in terms.items()}
    out["overhead"] = OVERHEAD_GIB
    out["total"] = round(sum(terms.values()) / GIB + OVERHEAD_GIB, 1)
    return out


def unit_seconds(packing: dict | None) -> float:
    """The length of one labelled unit: a packed window, else an average clip."""
    if packing and packing.get("enabled"):
        return float(packing.get("max_seconds") or 30)
    return MEAN_CLIP_SECONDS


def disk_per_hour(
    teacher: WhisperDimensions, seconds_per_unit: float, max_new_tokens: int
) -> dict[str, float]:
    """GiB per hour of audio (unrounded): the label store, and the encoder cache (one fp16 [1500, d_model] per
    unit)."""
    units = 3600 / seconds_per_unit
    tokens = min(max_new_tokens, TOKENS_PER_SECOND * seconds_per_unit)
    return {
        "labels": units * (tokens * LABEL_BYTES_PER_TOKEN + LABEL_BYTES_PER_ROW) / GIB,
        "encoder_cache": units * MAX_SOURCE_POSITIONS * teacher.d_model * 2 / GIB,
    }


def token_budget(
    global_batch: int, max_steps: int, seconds_per_unit: float, audio_hours: float | None
) -> dict[str, Any]:
    """Samples and label tokens a run sees, and the passes over the data that makes when its size is known."""
    samples = global_batch * max_steps
    out: dict[str, Any] = {
        "global_batch": global_batch,
        "steps": max_steps,
        "samples_seen": samples,
        "label_tokens_per_step": round(global_batch * TOKENS_PER_SECOND * seconds_per_unit),
    }
    if audio_hours:
        out["epochs"] = round(samples / (audio_hours * 3600 / seconds_per_unit), 2)
    return out


# ------------------------------------------------------------------------------------------------ from configs


def _layer_count(value: Any, all_layers: int) -> int:
    """A student's layer setting (null: all, N, or a list of teacher layers) as a count."""
    if value is None:
        return all_layers
    return len(value) if hasattr(value, "__len__") else int(value)  # a list (or ListConfig) of layers


def _unknown(model_cfg: Any) -> dict[str, str]:
    return {
        "note": f"no estimate: the dimensions of {model_cfg.get('path') or model_cfg.get('name')!r} are not known "
        "offline (a local directory with config.json, a standard openai/whisper-* id or a packaged teacher are)"
    }


def estimate_training(cfg: Any) -> dict[str, Any]:
    """The sizing section of `distil-train dry_run=true`, from a composed train config."""
    from distil.whisper.dimensions import model_dimensions

    dims = model_dimensions(cfg.teacher)
    if dims is None:
        return _unknown(cfg.teacher)
    enc = _layer_count(cfg.student.get("encoder_layers"), dims.encoder_layers)
    freeze = cfg.model.get("freeze_encoder")
    student = StudentShape(
        encoder_layers=enc,
        decoder_layers=_layer_count(cfg.student.get("decoder_layers"), dims.decoder_layers),
        shares_encoder=cfg.student.get("encoder_layers") is None and freeze in ("auto", True),
        freeze_embed_tokens=bool(cfg.model.get("freeze_embed_tokens")),
        freeze_embed_positions=bool(cfg.model.get("freeze_embed_positions")),
    )
    trainer = cfg.trainer
    devices = trainer.get("devices") if isinstance(trainer.get("devices"), int) else 1
    accumulate = int(trainer.get("accumulate_grad_batches") or 1)
    global_batch = int(cfg.data.batch_size) * devices * int(trainer.get("num_nodes") or 1) * accumulate
    estimate = cfg.get("estimate") or {}
    seconds = float(estimate.get("unit_seconds") or 30)
    hours = estimate.get("audio_hours")
    per_hour = disk_per_hour(dims, seconds, MAX_TARGET_POSITIONS)
    cached = bool(cfg.encoder_cache.get("enabled"))
    out: dict[str, Any] = {
        "parameters_millions": {k: round(n / 1e6, 1) for k, n in parameters(dims, student).items()},
        "gpu_memory_per_device_gib": training_memory(
            dims,
            student,
            int(cfg.data.batch_size),
            int(cfg.data.get("max_label_length") or MAX_TARGET_POSITIONS),
            trainer.get("precision"),
            encoder_cached=cached,
        ),
        "tokens": token_budget(global_batch, int(trainer.max_steps), seconds, hours),
    }
    if cached:
        out["disk"] = _disk({"encoder_cache": per_hour["encoder_cache"]}, hours)
    out["assumptions"] = ASSUMPTIONS
    return out


def estimate_labelling(cfg: Any) -> dict[str, Any]:
    """The sizing section of `distil-pseudo-label dry_run=true`, from a composed pseudo_label config."""
    from distil.whisper.dimensions import model_dimensions

    dims = model_dimensions(cfg.teacher)
    if dims is None:
        return _unknown(cfg.teacher)
    max_new = int(cfg.generation.max_new_tokens)
    seconds = unit_seconds(cfg.get("packing"))
    per_hour = disk_per_hour(dims, seconds, max_new)
    wanted = ["labels"] + (["encoder_cache"] if cfg.encoder_cache.get("enabled") else [])
    return {
        "gpu_memory_per_device_gib": labelling_memory(dims, int(cfg.batch_size), max_new, cfg.dtype),
        "unit_seconds": seconds,
        "disk": _disk({k: per_hour[k] for k in wanted}, (cfg.get("estimate") or {}).get("audio_hours")),
        "assumptions": LABELLING_ASSUMPTIONS,
    }


def _disk(per_hour_gib: dict[str, float], hours: Any) -> dict[str, Any]:
    """MiB per hour of audio, and GiB in all when the hours are known."""
    out: dict[str, Any] = {"mib_per_hour": {k: round(v * GIB / MIB, 1) for k, v in per_hour_gib.items()}}
    if hours:
        out["gib_for_audio_hours"] = {k: round(v * float(hours), 1) for k, v in per_hour_gib.items()}
    return out
