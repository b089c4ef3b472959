"""Synthetic speech corpora from the Debian TTS engines: spec parsing, held-out planning of sentences and
voices, rendering (short clips, long-form recordings, noise), and the idempotent on-disk build.
"""

from __future__ import annotations

import hashlib
import logging
import random
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import datasets

from distil.data.audio import SAMPLING_RATE
from distil.data.tts import ENGINES, require_engine
from distil.utils.errors import InputError
from distil.utils.paths import RESOURCES_DIR

log = logging.getLogger(__name__)


FORMAT_VERSION = 2  # 2: per-speaker tempo and pitch, rows grouped by speaker


MARKER = ".distil_corpus.json"  # hidden, so datasets' file discovery never picks it up


SPLITS = ("train", "validation", "test")


RESOURCES = RESOURCES_DIR
# The bundled bank: WordNet 3.0's usage examples (natural English, resources/extract_wordnet.py), the
# project's own normaliser-exercising sentences (numbers, times, money, titles) and its short utterances (digit
# strings, dates, commands, one- and two-word answers; both from resources/make_sentences.py).
DEFAULT_SENTENCES = tuple(
    RESOURCES / name for name in ("wordnet_examples.txt", "sentences.txt", "short_utterances.txt")
)


PEAK = 0.9  # every clip is scaled to this peak: TTS engines differ a lot in level, some clip


FEATURES = datasets.Features(
    {
        "audio": datasets.Audio(sampling_rate=SAMPLING_RATE, decode=False),
        "text": datasets.Value("string"),
        "id": datasets.Value("string"),
        "speaker": datasets.Value("string"),
        "duration": datasets.Value("float64"),
    }
)


class CorpusConfigError(InputError):
    """A corpus config that cannot be built; the message names the key and the fix."""


def noisy_corpus_name(name: str, kind: str, snr_db: float) -> str:
    return f"{name}_{kind}_snr{snr_db:g}"


def _stable_seed(*parts: Any) -> int:
    digest = hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little")


def load_sentences(paths: str | Path | Sequence[str | Path] | None = None) -> list[str]:
    """Distinct non-empty lines of the sentence files (the bundled bank by default), in file order."""
    if paths is None:
        paths = DEFAULT_SENTENCES
    elif isinstance(paths, (str, Path)):
        paths = [paths]
    lines: list[str] = []
    for path in map(Path, paths):
        if not path.is_file():
            raise CorpusConfigError(f"sentences: file {path} does not exist")
        found = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if not found:
            raise CorpusConfigError(f"sentences: file {path} has no sentences (one per line expected)")
        lines += found
    return list(dict.fromkeys(lines))


def partition_sentences(
    sentences: Sequence[str], pools: Mapping[str, float], seed: int
) -> dict[str, list[str]]:
    """Split the bank into disjoint train/validation/test pools; `pools` gives validation/test fractions."""
    unknown = set(pools) - {"validation", "test"}
    if unknown:
        raise CorpusConfigError(f"sentence_pools: unknown key(s) {sorted(unknown)}; use validation and test")
    fractions = {split: float(pools.get(split, 0.0)) for split in ("validation", "test")}
    if any(f < 0 for f in fractions.values()) or sum(fractions.values()) >= 1:
        raise CorpusConfigError(f"sentence_pools: fractions {fractions} must be >= 0 and sum to < 1")
    order = list(sentences)
    random.Random(_stable_seed("sentences", seed)).shuffle(order)
    n_test = round(fractions["test"] * len(order))
    n_val = round(fractions["validation"] * len(order))
    return {
        "test": order[:n_test],
        "validation": order[n_test : n_test + n_val],
        "train": order[n_test + n_val :],
    }


def _run(cmd: list[str]) -> str:
    return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout


@cache
def available_voices(engine: str) -> tuple[frozenset[str], frozenset[str]]:
    """(voices, variants) the installed engine knows; variants are espeak-ng's "+name" suffixes."""
    exe = require_engine(engine)
    if engine == "festival":
        # "(cmu_us_slt_arctic_hts ked_diphone kal_diphone)"
        text = _run([exe, "-b", "(print (voice.list))"])
        return frozenset(text.strip().strip("()").split()), frozenset()
    if engine == "flite":
        # "Voices available: kal awb_time kal16 awb rms slt"
        text = _run([exe, "-lv"])
        return frozenset(text.split(":", 1)[-1].split()), frozenset()
    voices: set[str] = set()
    for line in _run([exe, "--voices"]).splitlines()[1:]:
        cols = line.split()
        if len(cols) >= 5:
            voices.update({cols[1], cols[4], cols[4].rsplit("/", 1)[-1]})
    variants = {
        line.split()[4].rsplit("/", 1)[-1]
        for line in _run([exe, "--voices=variant"]).splitlines()[1:]
        if len(line.split()) >= 5
    }
    return frozenset(voices), frozenset(variants)


def check_voice(engine: str, voice: str, key: str) -> None:
    """Raise naming `key` unless the engine has `voice` (flite silently falls back, espeak ignores bad variants)."""
    voices, variants = available_voices(engine)
    base, _, variant = voice.partition("+")
    if base not in voices:
        raise CorpusConfigError(
            f"{key}: {engine} has no voice {base!r}; installed voices: {', '.join(sorted(voices))}"
        )
    if variant and variant not in variants:
        raise CorpusConfigError(
            f"{key}: {engine} has no voice variant {variant!r} (in {voice!r}); "
            f"see `espeak-ng --voices=variant`"
        )


@dataclass(frozen=True)
class CorpusSpec:
    """One corpus: an engine, voices and sizes per split. `kind="longform"` joins utterances.

    Each voice is one speaker: its tempo (and espeak-ng pitch) is drawn once from the configured range.
    """

    name: str
    engine: str
    voices: dict[str, list[str]]
    sizes: dict[str, int]
    rate: int | None = None  # espeak-ng words per minute at tempo 1 (default 175); others ignore it
    tempo: tuple[float, float] = (1.0, 1.0)  # speaking-rate factor range, drawn per voice
    pitch: tuple[int, int] | None = None  # espeak-ng base pitch range (0-99), drawn per voice
    kind: str = "utterances"
    min_duration_s: float = 60.0
    max_duration_s: float = 120.0
    pause_s: float = 0.6


def parse_spec(name: str, raw: Mapping[str, Any]) -> CorpusSpec:
    """Validate one `corpora.<name>` entry (engine installed, voices exist, held-out voices)."""
    key = f"corpora.{name}"
    raw = dict(raw)
    kind = raw.pop("kind", "utterances")
    if kind not in ("utterances", "longform"):
        raise CorpusConfigError(f"{key}.kind: {kind!r} is not one of utterances, longform")
    engine = raw.pop("engine", None)
    if engine not in ENGINES:
        raise CorpusConfigError(f"{key}.engine: unknown TTS engine {engine!r}; choose one of {ENGINES}")
    require_engine(engine)  # TTSUnavailable ("run `make setup`") when the engine is missing
    sizes = {str(k): int(v) for k, v in dict(raw.pop("sizes", None) or {}).items()}
    voices_raw = dict(raw.pop("voices", None) or {})
    voices = {str(k): [str(v) for v in vs] for k, vs in voices_raw.items() if vs is not None}
    if kind == "utterances" and "validation" in sizes and "validation" not in voices:
        voices["validation"] = list(voices.get("train", []))  # new sentences, known voices
    bad_splits = (set(sizes) | set(voices)) - (set(SPLITS) if kind == "utterances" else {"test"})
    if bad_splits:
        allowed = SPLITS if kind == "utterances" else ("test",)
        raise CorpusConfigError(f"{key}: unknown split(s) {sorted(bad_splits)}; use {allowed}")
    for split, n in sizes.items():
        if n < 0:
            raise CorpusConfigError(f"{key}.sizes.{split}: must be >= 0, got {n}")
        if n > 0 and not voices.get(split):
            raise CorpusConfigError(f"{key}.voices.{split}: no voices given for {n} utterances")
    for split, vs in voices.items():
        for voice in vs:
            check_voice(engine, voice, f"{key}.voices.{split}")
    held = set(voices.get("test", [])) & set(voices.get("train", []))
    if held:
        raise CorpusConfigError(
            f"{key}.voices.test: {sorted(held)} also in voices.train; test voices must be held out"
        )
    allowed = {"rate", "tempo", "pitch", "min_duration_s", "max_duration_s", "pause_s"}
    if set(raw) - allowed:
        raise CorpusConfigError(
            f"{key}: unknown key(s) {sorted(set(raw) - allowed)}; known: {sorted(allowed)}"
        )
    raw["tempo"] = _range(raw.get("tempo", 1.0), f"{key}.tempo", 0.5, 2.0)
    if raw.get("pitch") is not None:
        if engine != "espeak-ng":
            raise CorpusConfigError(f"{key}.pitch: only espeak-ng takes a pitch; remove it for {engine}")
        low, high = _range(raw["pitch"], f"{key}.pitch", 0, 99)
        raw["pitch"] = (round(low), round(high))
    spec = CorpusSpec(name=name, engine=engine, voices=voices, sizes=sizes, kind=kind, **raw)
    if kind == "longform" and not 0 < spec.min_duration_s <= spec.max_duration_s:
        raise CorpusConfigError(f"{key}: need 0 < min_duration_s <= max_duration_s")
    return spec


def _range(value: Any, key: str, lowest: float, highest: float) -> tuple[float, float]:
    """A number or a [low, high] pair as a (low, high) range within [lowest, highest]."""
    pair = [value, value] if isinstance(value, (int, float)) else list(value)
    if len(pair) != 2 or not lowest <= float(pair[0]) <= float(pair[1]) <= highest:
        raise CorpusConfigError(
            f"{key}: {value!r} must be a number or [low, high] with {lowest} <= low <= high <= {highest}"
        )
    return float(pair[0]), float(pair[1])


@dataclass(frozen=True)
class Item:
    """One row to render: an utterance (one sentence) or a long-form recording (candidate sentences)."""

    id: str
    voice: str
    texts: tuple[str, ...]
    target_s: float = 0.0  # long-form only
    tempo: float = 1.0
    pitch: int | None = None


def speaker_prosody(spec: CorpusSpec, voice: str, seed: int) -> dict[str, Any]:
    """The tempo and pitch of one voice (one speaker), the same in every split and run."""
    rng = random.Random(_stable_seed(spec.name, "prosody", voice, seed))
    prosody: dict[str, Any] = {"tempo": round(rng.uniform(*spec.tempo), 3)}
    if spec.pitch is not None:
        prosody["pitch"] = rng.randint(*spec.pitch)
    return prosody


@dataclass
class Plan:
    spec: CorpusSpec
    splits: dict[str, list[Item]] = field(default_factory=dict)


def plan_corpus(spec: CorpusSpec, pools: Mapping[str, Sequence[str]], seed: int) -> Plan:
    """Decide every row (id, voice, text) without synthesising; raises if a pool is too small."""
    plan = Plan(spec)
    for split, n in spec.sizes.items():
        if n == 0:
            continue
        pool = list(pools[split])
        voices = spec.voices[split]
        rng = random.Random(_stable_seed(spec.name, split, seed))
        rng.shuffle(pool)
        if spec.kind == "longform":
            if not pool:
                raise CorpusConfigError(f"corpora.{spec.name}: the {split} sentence pool is empty")
            items = []
            for k in range(n):
                order = pool[:]
                rng.shuffle(order)
                target = rng.uniform(spec.min_duration_s, spec.max_duration_s)
                voice = voices[k % len(voices)]
                items.append(
                    Item(
                        f"{spec.name}-{split}-{k:05d}",
                        voice,
                        tuple(order),
                        target,
                        **speaker_prosody(spec, voice, seed),
                    )
                )
        else:
            # Sentence s is spoken by a different voice on each pass over the pool, so the
            # (sentence, voice) pairs are distinct: at most len(pool) * len(voices) rows.
            if n > len(pool) * len(voices):
                raise CorpusConfigError(
                    f"corpora.{spec.name}.sizes.{split}: {n} utterances requested but the {split} "
                    f"sentence pool has {len(pool)} sentences x {len(voices)} voices; lower the size, "
                    f"add voices, add sentences or change sentence_pools"
                )
            rows = [
                (voices[(k % len(pool) + k // len(pool)) % len(voices)], pool[k % len(pool)])
                for k in range(n)
            ]
            # Rows grouped by speaker (stable), as real corpora are ordered by speaker and chapter: packing
            # joins consecutive clips of one speaker, so an interleaved order would pack nothing.
            rows.sort(key=lambda row: voices.index(row[0]))
            prosody = {voice: speaker_prosody(spec, voice, seed) for voice in voices}
            items = [
                Item(f"{spec.name}-{split}-{k:05d}", voice, (text,), **prosody[voice])
                for k, (voice, text) in enumerate(rows)
            ]
        plan.splits[split] = items
    return plan
