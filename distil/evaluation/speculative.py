"""Speculative decoding: the teacher verifies the tokens its distilled student drafts.

The student keeps the teacher's encoder, so it only needs to be loaded as a decoder
(`WhisperForCausalLM`): transformers' assisted generation hands the teacher's encoder outputs to a
decoder-only assistant, so the audio is encoded once per sample. The output is, by construction,
the teacher's own greedy output; the benchmark measures the speed-up and checks the equality.
A student whose encoder differs from the teacher's is run as a full encoder-decoder assistant instead
(two encoder passes, still exact, slower), and reported as not sharing the encoder.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch

from distil.data.audio import SAMPLING_RATE
from distil.evaluation.latency import synchronize, timed_generate
from distil.utils.errors import ConfigError

log = logging.getLogger(__name__)


def encoders_equal(teacher, student) -> bool:
    """True when the student's encoder weights are exactly the teacher's (so its outputs can be shared)."""
    t_state = teacher.model.encoder.state_dict()
    s_state = student.model.encoder.state_dict()
    if t_state.keys() != s_state.keys():
        return False
    return all(
        t_state[k].shape == s_state[k].shape and torch.equal(t_state[k].cpu(), s_state[k].cpu())
        for k in t_state
    )


def make_assistant(teacher, student) -> tuple[torch.nn.Module, bool]:
    """The assistant model for `teacher.generate(assistant_model=...)` and whether it shares the encoder.

    `student` is a loaded `WhisperForConditionalGeneration`. Raises ValueError when the two cannot work
    together (different vocabularies: drafted token ids would mean different things).
    """
    from transformers import WhisperForCausalLM

    if teacher.config.vocab_size != student.config.vocab_size:
        raise ConfigError(
            f"the assistant's vocabulary ({student.config.vocab_size}) differs from the teacher's "
            f"({teacher.config.vocab_size}): speculative decoding needs a student distilled from this teacher"
        )
    if teacher.config.d_model != student.config.d_model or not encoders_equal(teacher, student):
        log.warning(
            "student encoder differs from the teacher's: running it as a full encoder-decoder assistant"
        )
        student.generation_config = teacher.generation_config.__class__.from_dict(
            teacher.generation_config.to_dict()
        )
        return student.to(teacher.device, teacher.dtype).eval(), False
    decoder = WhisperForCausalLM(student.config)
    # WhisperForCausalLM names its decoder `model.decoder` like the seq2seq model; the encoder is dropped.
    state = {k: v for k, v in student.state_dict().items() if not k.startswith("model.encoder.")}
    missing, unexpected = decoder.load_state_dict(state, strict=False)
    missing = [k for k in missing if k != "proj_out.weight"]  # tied to the token embedding
    if missing or unexpected:
        raise ConfigError(
            f"cannot build a decoder-only assistant: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    decoder.tie_weights()
    decoder.generation_config = teacher.generation_config.__class__.from_dict(
        teacher.generation_config.to_dict()
    )
    return decoder.to(teacher.device, teacher.dtype).eval(), True


def speculative_benchmark(
    teacher,
    assistant,
    processor,
    waves: Sequence[np.ndarray],
    generate_kwargs: dict | None = None,
    warmup: int = 1,
    sampling_rate: int = SAMPLING_RATE,
) -> dict:
    """Time the teacher alone and the teacher with `assistant` on the same samples (batch size 1).

    Speculative decoding verifies one sequence at a time, so both runs use batch size 1 for a fair
    comparison. Returns timings, the speed-up and the fraction of samples whose token ids are
    identical to the teacher's greedy output (expected: 1.0).
    """
    if not waves:
        raise ConfigError("speculative decoding benchmark needs at least one audio sample")
    kwargs = {"do_sample": False, "num_beams": 1, **(generate_kwargs or {})}
    fe = processor.feature_extractor
    features = [
        fe(
            np.asarray(w, dtype=np.float32), sampling_rate=sampling_rate, return_tensors="pt"
        ).input_features.to(teacher.device, teacher.dtype)
        for w in waves
    ]
    for _ in range(warmup):
        timed_generate(teacher, features[0], kwargs)
        timed_generate(teacher, features[0], {**kwargs, "assistant_model": assistant})
    synchronize(teacher.device)
    base_ids, base_s, spec_ids, spec_s = [], 0.0, [], 0.0
    for feats in features:
        ids, seconds = timed_generate(teacher, feats, kwargs)
        base_ids.append(ids[0].tolist())
        base_s += seconds
        ids, seconds = timed_generate(teacher, feats, {**kwargs, "assistant_model": assistant})
        spec_ids.append(ids[0].tolist())
        spec_s += seconds
    eos = teacher.generation_config.eos_token_id
    identical = [
        _strip_after_eos(a, eos) == _strip_after_eos(b, eos) for a, b in zip(base_ids, spec_ids, strict=True)
    ]
    audio_s = sum(len(w) for w in waves) / sampling_rate
    return {
        "samples": len(waves),
        "batch_size": 1,
        "teacher_seconds": base_s,
        "speculative_seconds": spec_s,
        "speedup": base_s / spec_s if spec_s else None,
        "teacher_rtfx": audio_s / base_s if base_s else None,
        "speculative_rtfx": audio_s / spec_s if spec_s else None,
        "identical_fraction": sum(identical) / len(identical),
        "mismatched_samples": [i for i, same in enumerate(identical) if not same],
        "teacher_texts": processor.batch_decode(base_ids, skip_special_tokens=True),
        "speculative_texts": processor.batch_decode(spec_ids, skip_special_tokens=True),
    }


def _strip_after_eos(ids: list[int], eos) -> list[int]:
    eos = eos[0] if isinstance(eos, (list, tuple)) else eos
    return ids[: ids.index(eos) + 1] if eos in ids else ids
