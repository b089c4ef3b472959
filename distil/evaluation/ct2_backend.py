"""The CTranslate2 backend of the evaluation (`backend=ctranslate2 compute_type=int8`): the model as it runs
deployed in faster-whisper, with the short-form transcription and latency interface of the PyTorch model.

The evaluated model is exported once into the run directory (`distil.whisper.ct2_export`, quantised to the
compute type) and decoded greedily from the same features, batched the same way, as the PyTorch backend.
Long-form audio goes through faster-whisper itself, the way deployed users run it: `sequential` is
`WhisperModel.transcribe` without VAD (30-s windows moved by the predicted timestamps, temperature fallback),
`chunked` is `BatchedInferencePipeline` (segments cut at silences by its bundled Silero VAD, at most
chunk_length_s long, transcribed in batches).
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from distil.data.audio import SAMPLING_RATE
from distil.evaluation.latency import cpu_device_info, feature_batches, time_batches
from distil.evaluation.longform import ALGORITHMS, LongFormSettings
from distil.utils.errors import ConfigError
from distil.whisper.ct2_export import export_ct2, restore_float_mode
from distil.whisper.generation import Guards, Transcript, check_prompt, transcribe_by_duration
from distil.whisper.loading import LoadedModel, weights_size_bytes

BACKENDS = ("pytorch", "ctranslate2")
WHISPER_MAX_LENGTH = 448  # decoder positions (faster-whisper refuses a longer prompt + max_new_tokens)


@dataclass
class CT2Model:
    model: Any  # ctranslate2.models.Whisper
    processor: Any  # the source's WhisperProcessor: features and decoding, as the PyTorch backend
    name: str
    path: str  # the CTranslate2 directory
    compute_type: str
    threads: int
    source: dict  # the PyTorch model's info()
    kind: str = "ctranslate2"
    supports_speculative: ClassVar[bool] = False  # faster-whisper has no assistant model
    long_form_algorithms: ClassVar[tuple[str, ...]] = ALGORITHMS  # faster-whisper's own
    _faster_whisper: Any = None  # faster_whisper.WhisperModel over the same directory, built on first use

    def info(self) -> dict:
        import ctranslate2

        return {
            **self.source,
            "name": self.name,
            "path": self.path,
            "kind": self.kind,
            "source_path": self.source["path"],
            "dtype": self.compute_type,
            "size_bytes": weights_size_bytes(self.path),
            "ctranslate2": ctranslate2.__version__,
        }

    def device_info(self) -> dict:
        return cpu_device_info(self.threads)

    def prompt(self, language: str | None, task: str | None) -> list[int]:
        from transformers.models.whisper.tokenization_whisper import TO_LANGUAGE_CODE

        tokens = ["<|startoftranscript|>"]
        if check_prompt(self.model.is_multilingual, language, task):
            code = TO_LANGUAGE_CODE.get(str(language).lower(), language) if language else None
            tokens += ([f"<|{code}|>"] if code else []) + [f"<|{task or 'transcribe'}|>"]
        return self.processor.tokenizer.convert_tokens_to_ids([*tokens, "<|notimestamps|>"])

    def generate(
        self, features, prompt: list[int], max_new_tokens: int, num_beams: int = 1
    ) -> list[list[int]]:
        """Token ids after the prompt, without the end-of-text (CTranslate2 generates at most
        max_length // 2 tokens, OpenAI's sample_len = n_text_ctx // 2)."""
        import ctranslate2

        feats = ctranslate2.StorageView.from_array(np.ascontiguousarray(np.asarray(features, np.float32)))
        results = self.model.generate(
            feats, [prompt] * len(features), beam_size=int(num_beams), max_length=2 * int(max_new_tokens)
        )
        restore_float_mode()
        return [r.sequences_ids[0] for r in results]

    def transcribe(
        self,
        waves: Sequence[np.ndarray],
        batch_size: int,
        language: str | None,
        task: str | None,
        max_new_tokens: int,
        num_beams: int = 1,
        guards: Guards | None = None,
    ) -> list[Transcript]:
        """Short-form transcripts in input order. Without guards: CTranslate2's batched decoding from the same
        features as the PyTorch backend. With guards: faster-whisper's own temperature fallback, clip by clip,
        as deployed users run it (its compression-ratio threshold is OpenAI's 2.4 on text)."""
        if guards is not None:
            return [self._guarded(w, language, task, max_new_tokens, num_beams, guards) for w in waves]
        prompt = self.prompt(language, task)

        def transcripts_of(feats, seconds: list[float]) -> list[Transcript]:
            ids = self.generate(feats.numpy(), prompt, max_new_tokens, num_beams)
            texts = self.processor.tokenizer.batch_decode(ids, skip_special_tokens=True)
            return [
                Transcript(t.strip(), len(row), int(max_new_tokens))
                for t, row in zip(texts, ids, strict=True)
            ]

        return transcribe_by_duration(self.processor.feature_extractor, waves, batch_size, transcripts_of)

    def _guarded(
        self, wave, language, task, max_new_tokens: int, num_beams: int, guards: Guards
    ) -> Transcript:
        limit = guards.token_limit(len(wave) / SAMPLING_RATE, max_new_tokens)
        # faster-whisper asks CTranslate2 for max_length = prompt + max_new_tokens, of which CTranslate2 generates
        # at most half (see `generate`): this asks for `limit` tokens
        prompt = len(self.prompt(language, task))
        segments, _ = self.faster_whisper().transcribe(
            np.asarray(wave, np.float32),
            language=language,
            task=task or "transcribe",
            beam_size=int(num_beams),
            temperature=list(guards.temperature),
            compression_ratio_threshold=None if guards.compression_ratio_threshold is None else 2.4,
            log_prob_threshold=guards.logprob_threshold,
            no_speech_threshold=guards.no_speech_threshold,
            condition_on_previous_text=False,
            without_timestamps=True,
            vad_filter=False,
            max_new_tokens=min(2 * limit, WHISPER_MAX_LENGTH) - prompt,
        )
        segments = list(segments)  # they decode lazily
        restore_float_mode()
        text = " ".join(seg.text.strip() for seg in segments).strip()
        eos = self.processor.tokenizer.eos_token_id
        tokens = sum(sum(1 for t in seg.tokens if t < eos) for seg in segments)
        return Transcript(text, tokens, limit)

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
        """The PyTorch latency's schema and rules: features beforehand, only generation timed, tokens counted
        up to and including the end-of-text (a row shorter than the limit ended with one)."""
        prompt = self.prompt(language, task)

        def run(feats) -> tuple[int, float]:
            feats = feats.numpy()
            start = time.perf_counter()
            ids = self.generate(feats, prompt, max_new_tokens)
            seconds = time.perf_counter() - start
            return sum(len(row) + (len(row) < max_new_tokens) for row in ids), seconds

        def encode(feats) -> float:
            import ctranslate2

            view = ctranslate2.StorageView.from_array(np.ascontiguousarray(feats.numpy(), dtype=np.float32))
            start = time.perf_counter()
            self.model.encode(view)
            seconds = time.perf_counter() - start
            restore_float_mode()
            return seconds

        fe = self.processor.feature_extractor
        results = {
            str(b): {
                "batch_size": int(b),
                **time_batches(feature_batches(fe, waves, b, SAMPLING_RATE), run, warmup, repeats, encode),
            }
            for b in batch_sizes
        }
        return {"batch_sizes": results, "warmup_runs": warmup, "repeats": repeats, **self.device_info()}

    def faster_whisper(self):
        if self._faster_whisper is None:
            from faster_whisper import WhisperModel

            self._faster_whisper = WhisperModel(
                self.path, device="cpu", compute_type=self.compute_type, cpu_threads=self.threads
            )
            restore_float_mode()
        return self._faster_whisper

    def transcribe_long(
        self,
        waves: Sequence[np.ndarray],
        algorithm: str,
        settings: LongFormSettings,
        language: str | None,
        task: str | None,
    ) -> tuple[list[str], dict]:
        """Transcripts of whole recordings through faster-whisper, and the settings it ran with."""
        from faster_whisper import BatchedInferencePipeline

        model = self.faster_whisper()
        common = {"language": language, "task": task or "transcribe", "beam_size": 1}
        if algorithm == "chunked":
            chunk, batch_size = int(settings.chunk_length_s), int(settings.batch_size)
            pipeline = BatchedInferencePipeline(model)
            used = {"segmentation": "silero-vad", "chunk_length_s": chunk, "batch_size": batch_size}

            def run(wave):
                return pipeline.transcribe(wave, chunk_length=chunk, batch_size=batch_size, **common)
        elif algorithm == "sequential":
            seq = settings.sequential
            # faster-whisper measures the compression ratio on the text, as OpenAI does (threshold 2.4);
            # the PyTorch backend's threshold is on token bytes (transformers), so it does not carry over.
            used = {
                "vad_filter": False,
                "temperature": [float(t) for t in seq.temperature],
                "compression_ratio_threshold": 2.4,
                "log_prob_threshold": seq.logprob_threshold,
                "no_speech_threshold": seq.no_speech_threshold,
                "condition_on_previous_text": bool(seq.condition_on_prev_tokens),
            }

            def run(wave):
                return model.transcribe(wave, **common, **used)
        else:
            raise ConfigError(f"unknown long-form algorithm {algorithm!r}: use chunked or sequential")
        texts = []
        for wave in waves:
            segments, _ = run(np.asarray(wave, np.float32))
            texts.append(" ".join(s.text.strip() for s in segments).strip())  # segments decode lazily
            restore_float_mode()
        return texts, {"runtime": "faster-whisper", **used}


def load_ct2(
    whisper: LoadedModel, out_dir: str | Path, compute_type: str, threads: int | None = None
) -> CT2Model:
    """Export the loaded model into `out_dir` (reused when it is already its export) and load it on the CPU."""
    import ctranslate2
    import torch

    threads = int(threads or torch.get_num_threads())
    source = Path(whisper.path)
    with tempfile.TemporaryDirectory(prefix="distil-ct2-source-") as tmp:
        if whisper.kind != "hf" or not source.is_dir():  # a training checkpoint: its weights as a directory
            source = Path(tmp)
            whisper.model.save_pretrained(source)
            whisper.processor.save_pretrained(source)
        export_ct2(source, out_dir, compute_type, source_name=whisper.path, force=True)
    model = ctranslate2.models.Whisper(
        str(out_dir), device="cpu", compute_type=compute_type, intra_threads=threads
    )
    restore_float_mode()
    name = f"{whisper.name} (ctranslate2 {compute_type})"
    return CT2Model(model, whisper.processor, name, str(out_dir), compute_type, threads, whisper.info())
