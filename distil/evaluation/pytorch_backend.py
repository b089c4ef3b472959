"""The PyTorch backend of the evaluation (`backend=pytorch`, the default): the loaded transformers model with the
interface every backend has (`distil.evaluation.ct2_backend.CT2Model` is the other), so the sections never ask
which backend runs:

  transcribe(waves, batch_size, language, task, max_new_tokens, num_beams)  short-form transcripts
  transcribe_long(waves, algorithm, settings, language, task)               whole recordings, and the settings used
  measure_latency(waves, batch_sizes, warmup, repeats, language, task, max_new_tokens)
  speculative(assistant, waves, language, task, max_new_tokens, warmup)     only where `supports_speculative`
  long_form_algorithms                                                       the algorithms transcribe_long runs
  info(), device_info()
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from typing import ClassVar

import numpy as np

from distil.evaluation.latency import device_info, measure_latency
from distil.evaluation.longform import ALGORITHMS, LongFormSettings, transcribe_chunked, transcribe_sequential
from distil.utils.errors import ConfigError
from distil.whisper.generation import generation_kwargs
from distil.whisper.loading import LoadedModel


@dataclass
class PyTorchModel(LoadedModel):
    supports_speculative: ClassVar[bool] = True  # transformers' assisted generation
    long_form_algorithms: ClassVar[tuple[str, ...]] = ALGORITHMS

    @classmethod
    def of(cls, loaded: LoadedModel) -> PyTorchModel:
        return cls(**{f.name: getattr(loaded, f.name) for f in fields(LoadedModel)})

    def device_info(self) -> dict:
        return device_info(self.model.device)

    def transcribe_long(
        self,
        waves: Sequence[np.ndarray],
        algorithm: str,
        settings: LongFormSettings,
        language: str | None,
        task: str | None,
    ) -> tuple[list[str], dict]:
        """Transcripts of whole recordings by `algorithm` (chunked: transformers' pipeline over overlapping
        windows; sequential: OpenAI's, through `generate` on untruncated features), and the settings used."""
        gen = generation_kwargs(self.model, language, task, settings.max_new_tokens, 1)
        if algorithm == "chunked":
            texts = transcribe_chunked(
                self.model,
                self.processor,
                waves,
                settings.chunk_length_s,
                settings.stride,
                settings.batch_size,
                gen,
            )
            used = {
                "chunk_length_s": settings.chunk_length_s,
                "stride_length_s": settings.stride,
                "batch_size": settings.batch_size,
            }
            return texts, used
        if algorithm == "sequential":
            gen.pop("max_new_tokens")  # the per-window limit is the model's
            texts = transcribe_sequential(
                self.model, self.processor, waves, settings.sequential, settings.sequential_batch_size, gen
            )
            options = {k: v for k, v in asdict(settings.sequential).items() if k != "extra"}
            options["temperature"] = list(options["temperature"])
            return texts, {"batch_size": settings.sequential_batch_size, **options}
        raise ConfigError(f"unknown long-form algorithm {algorithm!r}: use chunked or sequential")

    def measure_latency(
        self,
        waves: Sequence[np.ndarray],
        batch_sizes: Sequence[int],
        warmup: int,
        repeats: int,
        language: str | None,
        task: str | None,
        max_new_tokens: int,
    ) -> dict:
        gen = generation_kwargs(self.model, language, task, max_new_tokens, 1)
        return measure_latency(self.model, self.processor, waves, batch_sizes, warmup, repeats, gen)

    def speculative(
        self,
        assistant: LoadedModel,
        waves: Sequence[np.ndarray],
        language: str | None,
        task: str | None,
        max_new_tokens: int,
        warmup: int,
    ) -> dict:
        """This model's speed-up with `assistant` drafting (batch size 1), with both runs' texts."""
        from distil.evaluation.speculative import make_assistant, speculative_benchmark

        drafter, shares_encoder = make_assistant(self.model, assistant.model)
        gen = generation_kwargs(self.model, language, task, max_new_tokens, 1)
        result = speculative_benchmark(self.model, drafter, self.processor, waves, gen, warmup)
        return {"assistant": assistant.info(), "shares_encoder": shares_encoder, **result}
