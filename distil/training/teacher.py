"""The frozen teacher beside the student: set-up checks and the state-dict hooks that keep it out of
checkpoints (pure functions; `WhisperDistiller` wires them in)."""

from __future__ import annotations

import logging
import warnings

from distil.utils.errors import InputError

log = logging.getLogger(__name__)


class DistillationSetupError(InputError):
    """A student/teacher/loss combination that cannot train (raised at start-up)."""


def without_teacher(module, state_dict, prefix, local_metadata) -> None:
    """State-dict post-hook: the teacher's weights are never saved."""
    for key in [k for k in state_dict if k.startswith(prefix + "teacher.")]:
        del state_dict[key]


def teacher_not_missing(module, incompatible_keys) -> None:
    """Load-state-dict post-hook: a checkpoint without the teacher's weights is whole."""
    incompatible_keys.missing_keys[:] = [
        k for k in incompatible_keys.missing_keys if not k.startswith("teacher.")
    ]


def resolve_freeze_encoder(setting: bool | str, identical: bool | None) -> bool:
    """`auto` freezes the student encoder iff it is the teacher's own (the paper's setting); a shrunk or changed
    encoder frozen on purpose (`true`) is allowed, loudly: it can then never learn to work with fewer layers."""
    if setting == "auto":
        return bool(identical)
    if not isinstance(setting, bool):
        raise DistillationSetupError(f"model.freeze_encoder must be auto, true or false, got {setting!r}")
    if setting and not identical:
        message = (
            "model.freeze_encoder=true freezes a student encoder that is not identical to the teacher's (a "
            "shrunk or already changed encoder): it stays as initialised for the whole run. Use "
            "model.freeze_encoder=auto (freeze only an identical copy) unless this is what you want"
        )
        log.warning(message)
        warnings.warn(message, stacklevel=3)
    return setting


def check_compatible(student_config, teacher_config) -> None:
    """Refuse a student whose vocabulary, width or mel bins differ from the teacher's."""
    s, t = student_config, teacher_config
    problems = []
    if s.vocab_size != t.vocab_size:
        problems.append(
            f"vocabulary {s.vocab_size} vs teacher {t.vocab_size} (KL compares distributions token by token)"
        )
    if s.d_model != t.d_model:
        problems.append(f"width d_model {s.d_model} vs teacher {t.d_model}")
    if s.num_mel_bins != t.num_mel_bins:
        problems.append(f"num_mel_bins {s.num_mel_bins} vs teacher {t.num_mel_bins}")
    if problems:
        raise DistillationSetupError(
            "student and teacher are not compatible for distillation: "
            + "; ".join(problems)
            + ". Initialise the student from this teacher (python -m distil.init_student), or train without "
            "a teacher (loss=sft or loss=finetune)"
        )


def check_encoder_cache(freeze_encoder: bool, has_teacher: bool, share_encoder: bool) -> None:
    """The encoder-output cache needs a frozen student encoder that is the teacher's (one shared pass)."""
    if not freeze_encoder:
        raise DistillationSetupError(
            "encoder_cache needs model.freeze_encoder=true (the encoder must not change)"
        )
    if has_teacher and not share_encoder:
        raise DistillationSetupError(
            "encoder_cache needs the student's frozen encoder to be identical to the teacher's "
            "(one shared encoder pass); this student's encoder differs"
        )


def resolve_share_encoder(share_encoder: bool | None, freeze_encoder: bool, identical: bool | None) -> bool:
    """`null` shares the encoder pass iff the student's encoder is frozen and the teacher's own."""
    if share_encoder is None:
        return bool(freeze_encoder and identical)
    if share_encoder and not (freeze_encoder and identical):
        raise DistillationSetupError(
            "share_encoder needs model.freeze_encoder=true and a student encoder identical to the teacher's"
        )
    return bool(share_encoder)
