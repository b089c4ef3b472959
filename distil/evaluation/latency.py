"""Generation speed: real-time factor and tokens per second, measured the same way for every model.

Only `generate` is timed (features are computed beforehand), warm-up runs are discarded, and on a GPU
the clock is read after `torch.cuda.synchronize()` so queued kernels are counted. Tokens/s counts only
what the model really produced: the forced decoder prompt, the padding after a finished sequence and
anything after its end-of-text token are left out. The encoder is also timed alone on the same batches, so
the decoder's own time per generated token is known: that is what distillation shrinks, and what carries
over to large teachers, whose decoders dominate (`whisper.generation.decoder_macs_per_token` gives its arithmetic bound).
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Iterable, Sequence

import numpy as np
import torch

from distil.data.audio import SAMPLING_RATE
from distil.utils.errors import ConfigError
from distil.whisper.generation import decoder_prompt_ids, end_of_text_id, generated_body


def count_real_tokens(
    sequences: torch.Tensor, eos_token_id: int, prompt_token_ids: Iterable[int] = ()
) -> int:
    """Generated tokens per row up to and including the first end-of-text, summed over the batch: the forced
    prompt (start-of-transcript, language, task, no-timestamps) and the padding after the end are not counted."""
    prompt = {int(t) for t in prompt_token_ids}
    bodies = [generated_body(row, eos_token_id, prompt) for row in sequences.tolist()]
    return sum(len(body) + ended for body, ended in bodies)


def device_info(device: torch.device | str) -> dict:
    device = torch.device(device)
    info = {
        "device": str(device),
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "platform": platform.platform(),
    }
    if device.type == "cuda":
        info["device_name"] = torch.cuda.get_device_name(device)
    else:
        info["device_name"] = platform.processor() or platform.machine()
    return info


def cpu_device_info(threads: int) -> dict:
    """What a runtime other than PyTorch ran on (CTranslate2, whisper.cpp, openai-whisper on the CPU)."""
    return {
        "device": "cpu",
        "threads": int(threads),
        "cpu_count": os.cpu_count(),
        "device_name": platform.processor() or platform.machine(),
        "platform": platform.platform(),
    }


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def timed_encode(model, features: torch.Tensor) -> float:
    """Seconds the encoder alone takes on `features` (the part of `generate` that is not decoding)."""
    synchronize(model.device)
    start = time.perf_counter()
    model.get_encoder()(features)
    synchronize(model.device)
    return time.perf_counter() - start


@torch.inference_mode()
def timed_generate(model, features: torch.Tensor, generate_kwargs: dict) -> tuple[torch.Tensor, float]:
    """Run `generate` once and return (sequences, seconds), synchronising the device around it."""
    synchronize(model.device)
    start = time.perf_counter()
    out = model.generate(input_features=features, **generate_kwargs)
    synchronize(model.device)
    seconds = time.perf_counter() - start
    return (out if torch.is_tensor(out) else out["sequences"]), seconds


def measure_latency(
    model,
    processor,
    waves: Sequence[np.ndarray],
    batch_sizes: Sequence[int] = (1, 8),
    warmup: int = 1,
    repeats: int = 1,
    generate_kwargs: dict | None = None,
    sampling_rate: int = SAMPLING_RATE,
) -> dict:
    """RTFx and tokens/s of `model.generate` over `waves` for each batch size (greedy unless told)."""
    generate_kwargs = dict(generate_kwargs or {})
    eos, prompt = end_of_text_id(model), decoder_prompt_ids(model)

    def run(feats: torch.Tensor) -> tuple[int, float]:
        ids, seconds = timed_generate(model, feats.to(model.device, model.dtype), generate_kwargs)
        return count_real_tokens(ids, eos, prompt), seconds

    def encode(feats: torch.Tensor) -> float:
        return timed_encode(model, feats.to(model.device, model.dtype))

    fe = processor.feature_extractor
    results = {
        str(b): {
            "batch_size": int(b),
            **time_batches(feature_batches(fe, waves, b, sampling_rate), run, warmup, repeats, encode),
        }
        for b in batch_sizes
    }
    return {"batch_sizes": results, "warmup_runs": warmup, "repeats": repeats, **device_info(model.device)}


def feature_batches(
    feature_extractor, waves: Sequence[np.ndarray], batch_size: int, sampling_rate: int = SAMPLING_RATE
) -> list[tuple[torch.Tensor, float]]:
    """(log-mel features, audio seconds) of consecutive batches of `waves`, computed before any timing."""
    if not waves:
        raise ConfigError("latency needs at least one audio sample")
    batches = []
    for start in range(0, len(waves), batch_size):
        chunk = [np.asarray(w, dtype=np.float32) for w in waves[start : start + batch_size]]
        feats = feature_extractor(chunk, sampling_rate=sampling_rate, return_tensors="pt").input_features
        batches.append((feats, sum(len(w) for w in chunk) / sampling_rate))
    return batches


def time_batches(
    batches: list[tuple[torch.Tensor, float]], run, warmup: int = 1, repeats: int = 1, encode=None
) -> dict:
    """RTFx and tokens/s of `run(features) -> (generated tokens, seconds)` over `batches` (one batch size);
    with `encode(features) -> seconds` (the encoder alone, timed right after each run) also the decoder's
    share: generation time minus encoder time, per generated token."""
    for _ in range(warmup):  # compile kernels, fill caches, let clocks settle
        run(batches[0][0])
        if encode is not None:
            encode(batches[0][0])
    seconds = tokens = audio = encoder_seconds = 0.0
    for _ in range(repeats):
        for feats, audio_s in batches:
            n, elapsed = run(feats)
            seconds += elapsed
            audio += audio_s
            tokens += n
            if encode is not None:
                encoder_seconds += encode(feats)
    result = {
        "samples": sum(len(f) for f, _ in batches) * repeats,
        "audio_seconds": audio,
        "generation_seconds": seconds,
        "rtfx": audio / seconds if seconds else None,
        "tokens": int(tokens),
        "tokens_per_second": tokens / seconds if seconds else None,
    }
    if encode is not None:
        decoder_seconds = max(seconds - encoder_seconds, 0.0)
        result.update(
            encoder_seconds=encoder_seconds,
            decoder_seconds=decoder_seconds,
            decoder_ms_per_token=1000 * decoder_seconds / tokens if tokens else None,
        )
    return result
