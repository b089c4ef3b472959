"""Evaluation backends for the exports other runtimes load: whisper.cpp (`format=ggml`, through pywhispercpp)
and openai-whisper (`format=openai`). `distil-evaluate model=path model.path=<export dir>` finds them by their
files (`detect_runtime_export`) and evaluates the export as its users run it: the runtime computes its own
log-mel features from the audio and runs its own decoding loop, loop guards and long-form algorithm.

They have the interface of the PyTorch backend (distil.evaluation.pytorch_backend) with two differences:
- both runtimes decode one recording at a time, so `batch_size` only groups recordings (latency per batch
  size is the time of the group, decoded one by one);
- long-form audio runs sequentially (OpenAI's algorithm, which both implement: 30-s windows moved by the
  predicted timestamps, temperature fallback, the previous window's text as the prompt when
  `condition_on_prev_tokens`); neither has a chunked algorithm, and the section says so (`long_form_algorithms`).

Token counts (the "cut at the token limit" signal, tokens/s) are those of the transcript re-tokenized with the
export's tokenizer: neither runtime returns the generated ids through its transcription API.
"""

from __future__ import annotations

import abc
import importlib.metadata
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from distil.data.audio import SAMPLING_RATE
from distil.evaluation.latency import cpu_device_info, time_batches
from distil.evaluation.longform import LongFormSettings
from distil.utils.errors import ConfigError
from distil.whisper.ct2_export import EXPORT_INFO
from distil.whisper.generation import Guards, Transcript
from distil.whisper.loading import weights_size_bytes

# The file each runtime's export is found by (distil.whisper.ggml_export / openai_export write them).
RUNTIME_FILES = {"ggml": "ggml-model.bin", "openai": "model.pt"}
# OpenAI's compression-ratio threshold on text (transformers' 1.35 on token bytes does not carry over).
OPENAI_COMPRESSION_RATIO = 2.4


def detect_runtime_export(path: str | Path | None) -> str | None:
    """ "ggml" or "openai" when `path` is a directory holding that runtime's export, else None."""
    if path is None or not Path(str(path)).expanduser().is_dir():
        return None
    folder = Path(str(path)).expanduser()
    return next((kind for kind, name in RUNTIME_FILES.items() if (folder / name).is_file()), None)


def export_record(folder: Path) -> dict:
    """What distil-export recorded about the export (its quantization, source, versions); {} if none."""
    record = folder / EXPORT_INFO
    return json.loads(record.read_text()) if record.is_file() else {}


@dataclass
class RuntimeModel(abc.ABC):
    """An export another runtime decodes from raw audio (see the module docstring)."""

    runtime: Any  # the runtime's model object
    processor: Any  # the export's WhisperProcessor: its tokenizer counts tokens
    name: str
    path: str
    threads: int
    multilingual: bool
    kind: ClassVar[str] = ""
    supports_speculative: ClassVar[bool] = False
    long_form_algorithms: ClassVar[tuple[str, ...]] = ("sequential",)

    def info(self) -> dict:
        folder = Path(self.path)
        config = (
            json.loads((folder / "config.json").read_text()) if (folder / "config.json").is_file() else {}
        )
        return {
            "name": self.name,
            "path": self.path,
            "kind": self.kind,
            "file": RUNTIME_FILES[self.kind],
            "size_bytes": weights_size_bytes(folder),
            "dtype": export_record(folder).get("quantization"),
            "decoder_layers": config.get("decoder_layers"),
            "encoder_layers": config.get("encoder_layers"),
            "runtime_version": self.runtime_version(),
        }

    def device_info(self) -> dict:
        return cpu_device_info(self.threads)

    @abc.abstractmethod
    def runtime_version(self) -> str: ...

    @abc.abstractmethod
    def decode(
        self, wave: np.ndarray, language: str | None, task: str | None, limit: int, guards: Guards | None
    ) -> str:
        """One short recording's text: greedy without guards, the runtime's own fallback with them."""

    @abc.abstractmethod
    def decode_long(
        self, wave: np.ndarray, settings: LongFormSettings, language: str | None, task: str | None
    ) -> tuple[str, dict]:
        """One long recording's text by the runtime's sequential algorithm, and the settings it ran with."""

    def language(self, language: str | None) -> str | None:
        return language if self.multilingual else "en"  # an English-only model is told so

    def count_tokens(self, text: str) -> int:
        return len(self.processor.tokenizer(text, add_special_tokens=False).input_ids) if text else 0

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
        if int(num_beams) != 1:
            raise ConfigError(f"eval.num_beams={num_beams}: the {self.kind} backend decodes greedily; use 1")
        out = []
        for wave in waves:
            seconds = len(wave) / SAMPLING_RATE
            limit = guards.token_limit(seconds, max_new_tokens) if guards else int(max_new_tokens)
            text = self.decode(np.asarray(wave, np.float32), self.language(language), task, limit, guards)
            out.append(Transcript(text, self.count_tokens(text), limit))
        return out

    def transcribe_long(
        self,
        waves: Sequence[np.ndarray],
        algorithm: str,
        settings: LongFormSettings,
        language: str | None,
        task: str | None,
    ) -> tuple[list[str], dict]:
        if algorithm not in self.long_form_algorithms:
            raise ConfigError(f"the {self.kind} backend has no {algorithm} long-form algorithm")
        texts, used = [], {}
        for wave in waves:
            text, used = self.decode_long(
                np.asarray(wave, np.float32), settings, self.language(language), task
            )
            texts.append(text)
        return texts, {"runtime": self.kind, **used}

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
        """The latency schema of the other backends; the whole transcription is timed (the runtime computes its
        own features), a group of `batch_size` recordings decoded one after the other; tokens: the transcript's,
        plus its end-of-text."""
        language = self.language(language)

        def run(group: list[np.ndarray]) -> tuple[int, float]:
            start = time.perf_counter()
            texts = [self.decode(w, language, task, int(max_new_tokens), None) for w in group]
            seconds = time.perf_counter() - start
            return sum(self.count_tokens(t) + 1 for t in texts), seconds

        results = {}
        for b in batch_sizes:
            groups = [
                [np.asarray(w, np.float32) for w in waves[i : i + int(b)]]
                for i in range(0, len(waves), int(b))
            ]
            batches = [(g, sum(len(w) for w in g) / SAMPLING_RATE) for g in groups]
            results[str(b)] = {"batch_size": int(b), **time_batches(batches, run, warmup, repeats)}
        return {"batch_sizes": results, "warmup_runs": warmup, "repeats": repeats, **self.device_info()}


class WhisperCppModel(RuntimeModel):
    """whisper.cpp, through pywhispercpp's binding."""

    kind: ClassVar[str] = "ggml"

    def runtime_version(self) -> str:
        return f"pywhispercpp {importlib.metadata.version('pywhispercpp')}"

    def _params(self, language: str | None, task: str | None, short: bool) -> dict:
        """Every option either call sets: pywhispercpp keeps an option passed once for the calls after it."""
        return {
            "language": language or "",
            "translate": task == "translate",
            "suppress_nst": True,  # the non-speech tokens transformers' generation config suppresses
            "n_threads": self.threads,
            "no_timestamps": short,
            "single_segment": short,
        }

    def decode(self, wave, language, task, limit, guards):
        params = {**self._params(language, task, short=True), "max_tokens": int(limit), "no_context": True}
        if guards is None:
            params.update(temperature=0.0, temperature_inc=0.0)
        else:  # whisper.cpp's own fallback: its entropy threshold is its measure of a loop
            params.update(_whisper_cpp_fallback(guards.temperature, guards.logprob_threshold))
            params["no_speech_thold"] = guards.no_speech_threshold or 1.0
        segments = self.runtime.transcribe(wave, **params)
        return "".join(s.text for s in segments).strip()

    def decode_long(self, wave, settings, language, task):
        seq = settings.sequential
        used = {
            "algorithm": "whisper.cpp whisper_full (sequential)",
            **_whisper_cpp_fallback(seq.temperature, seq.logprob_threshold),
            "no_speech_thold": seq.no_speech_threshold or 1.0,
            "no_context": not seq.condition_on_prev_tokens,
        }
        params = {
            **self._params(language, task, short=False),
            "max_tokens": 0,
            **used,
        }  # 0: no limit per segment
        params.pop("algorithm")
        segments = self.runtime.transcribe(wave, **params)
        return " ".join(s.text.strip() for s in segments).strip(), used


def _whisper_cpp_fallback(temperatures: Sequence[float], logprob_threshold: float | None) -> dict:
    """whisper.cpp's temperature fallback: a first temperature and a step (it cannot take an arbitrary list)."""
    temps = [float(t) for t in temperatures]
    step = round(temps[1] - temps[0], 6) if len(temps) > 1 else 0.0
    return {"temperature": temps[0], "temperature_inc": step, "logprob_thold": logprob_threshold or -1e9}


class OpenAIWhisperModel(RuntimeModel):
    """The openai-whisper package (`whisper.load_model` on the exported model.pt)."""

    kind: ClassVar[str] = "openai"

    def runtime_version(self) -> str:
        return f"openai-whisper {importlib.metadata.version('openai-whisper')}"

    def decode(self, wave, language, task, limit, guards):
        import whisper

        if guards is None:  # greedy, one window: whisper.decode on the padded log-mel
            mel = whisper.log_mel_spectrogram(whisper.pad_or_trim(wave), self.runtime.dims.n_mels)
            options = whisper.DecodingOptions(
                temperature=0.0,
                without_timestamps=True,
                fp16=False,
                language=language,
                task=task or "transcribe",
                sample_len=int(limit),
            )
            return whisper.decode(self.runtime, mel, options).text.strip()
        result = self.runtime.transcribe(
            wave,
            temperature=tuple(guards.temperature),
            compression_ratio_threshold=OPENAI_COMPRESSION_RATIO
            if guards.compression_ratio_threshold
            else None,
            logprob_threshold=guards.logprob_threshold,
            no_speech_threshold=guards.no_speech_threshold,
            condition_on_previous_text=False,
            without_timestamps=True,
            fp16=False,
            language=language,
            task=task or "transcribe",
            sample_len=int(limit),
            verbose=None,
        )
        return result["text"].strip()

    def decode_long(self, wave, settings, language, task):
        seq = settings.sequential
        used = {
            "algorithm": "openai-whisper transcribe (sequential)",
            "temperature": [float(t) for t in seq.temperature],
            "compression_ratio_threshold": OPENAI_COMPRESSION_RATIO
            if seq.compression_ratio_threshold
            else None,
            "logprob_threshold": seq.logprob_threshold,
            "no_speech_threshold": seq.no_speech_threshold,
            "condition_on_previous_text": bool(seq.condition_on_prev_tokens),
        }
        options = {**used, "temperature": tuple(used["temperature"])}
        options.pop("algorithm")
        result = self.runtime.transcribe(
            wave, **options, fp16=False, language=language, task=task or "transcribe", verbose=None
        )
        return result["text"].strip(), used


def load_runtime_export(kind: str, path: str | Path, name: str | None = None, threads: int | None = None):
    """The export at `path` loaded in its runtime, on the CPU, with the export's tokenizer."""
    import torch
    from transformers import WhisperProcessor

    folder = Path(str(path)).expanduser()
    threads = int(threads or torch.get_num_threads())
    try:
        processor = WhisperProcessor.from_pretrained(str(folder))
    except (OSError, ValueError) as err:
        raise ConfigError(
            f"{folder}: the {kind} export has no tokenizer/preprocessor files ({err}); export it again with "
            "distil-export"
        ) from err
    config = json.loads((folder / "config.json").read_text()) if (folder / "config.json").is_file() else {}
    multilingual = int(config.get("vocab_size", 51865)) >= 51865
    label = name or folder.name
    if kind == "ggml":
        try:
            from pywhispercpp.model import Model
        except ImportError as err:
            raise ConfigError(
                f"{folder} is a whisper.cpp export: evaluating it needs pywhispercpp (pip install 'distil[ggml]')"
            ) from err
        runtime = Model(
            str(folder / RUNTIME_FILES["ggml"]),
            redirect_whispercpp_logs_to=None,
            n_threads=threads,
            print_progress=False,
        )
        return WhisperCppModel(
            runtime, processor, f"{label} (whisper.cpp)", str(folder), threads, multilingual
        )
    if kind == "openai":
        try:
            import whisper
        except ImportError as err:
            raise ConfigError(
                f"{folder} is an openai-whisper export: evaluating it needs openai-whisper "
                "(pip install 'distil[openai]')"
            ) from err
        runtime = whisper.load_model(str(folder / RUNTIME_FILES["openai"]), device="cpu")
        return OpenAIWhisperModel(
            runtime, processor, f"{label} (openai-whisper)", str(folder), threads, multilingual
        )
    raise ConfigError(f"unknown runtime export kind {kind!r}: {sorted(RUNTIME_FILES)}")
