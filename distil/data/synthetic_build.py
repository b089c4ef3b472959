"""Building the synthetic corpora planned by `distil.data.synthetic`: rendering each item (TTS, long-form joins,
noise at an SNR), writing the splits as parquet, and the idempotent, atomic on-disk build of every corpus.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from distil.data.audio import NOISE_TYPES, SAMPLING_RATE, add_noise, encode_flac, make_noise
from distil.data.synthetic import (
    FEATURES,
    FORMAT_VERSION,
    MARKER,
    PEAK,
    CorpusConfigError,
    Item,
    Plan,
    _stable_seed,
    load_sentences,
    noisy_corpus_name,
    parse_spec,
    partition_sentences,
    plan_corpus,
)
from distil.data.tts import synthesize

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Noise:
    type: str
    snr_db: float


@dataclass(frozen=True)
class Render:
    engine: str
    rate: int | None
    sampling_rate: int
    noise: Noise | None
    seed: int
    pause_s: float = 0.6
    min_duration_s: float = 0.0
    max_duration_s: float = 0.0


def _speak(text: str, item: Item, r: Render) -> np.ndarray:
    wave = synthesize(
        text,
        r.engine,
        item.voice,
        sampling_rate=r.sampling_rate,
        rate=r.rate,
        tempo=item.tempo,
        pitch=item.pitch,
    )
    peak = float(np.max(np.abs(wave))) if wave.size else 0.0
    if peak == 0.0:
        raise RuntimeError(f"{r.engine} voice {item.voice!r} produced silence for {text!r}")
    return (wave * (PEAK / peak)).astype(np.float32)


def _longform(item: Item, r: Render) -> tuple[np.ndarray, str]:
    """Join sentences (with pauses) until the recording reaches its target duration."""
    pause = np.zeros(int(round(r.pause_s * r.sampling_rate)), dtype=np.float32)
    parts: list[np.ndarray] = []
    texts: list[str] = []
    total = 0
    target = int(item.target_s * r.sampling_rate)
    limit = int(r.max_duration_s * r.sampling_rate)
    for text in item.texts:
        wave = _speak(text, item, r)
        extra = wave.size + (pause.size if parts else 0)
        if total + extra > limit:
            if total >= r.min_duration_s * r.sampling_rate:
                break  # long enough already; another sentence would overshoot the maximum
            continue  # still too short: try a shorter sentence
        if parts:
            parts.append(pause)
        parts.append(wave)
        texts.append(text)
        total += extra
        if total >= target:
            break
    if total < r.min_duration_s * r.sampling_rate:
        raise CorpusConfigError(
            f"long-form recording {item.id}: the test sentence pool only gives {total / r.sampling_rate:.0f} s, "
            f"below min_duration_s={r.min_duration_s}; add sentences or lower the duration"
        )
    return np.concatenate(parts), " ".join(texts)


def render_item(item: Item, r: Render) -> dict[str, Any]:
    if r.max_duration_s:
        wave, text = _longform(item, r)
    else:
        wave, text = _speak(item.texts[0], item, r), item.texts[0]
    if r.noise is not None:
        noise = make_noise(r.noise.type, wave.size, _stable_seed("noise", r.seed, item.id, r.noise.type))
        wave = add_noise(wave, noise, r.noise.snr_db)
    return {
        "audio": {"bytes": encode_flac(wave, r.sampling_rate), "path": f"{item.id}.flac"},
        "text": text,
        "id": item.id,
        "speaker": f"{r.engine}:{item.voice}",
        "duration": wave.size / r.sampling_rate,
    }


def _config_hash(plan: Plan, render: Render, shard_size: int) -> str:
    payload = {
        "format": FORMAT_VERSION,
        "render": asdict(render),
        "shard_size": shard_size,
        "splits": {split: [asdict(item) for item in items] for split, items in plan.splits.items()},
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _write_split(rows: list[dict[str, Any]], split_dir: Path, split: str, shard_size: int) -> None:
    split_dir.mkdir(parents=True)
    n_shards = max(1, -(-len(rows) // shard_size))
    schema = FEATURES.arrow_schema
    for i in range(n_shards):
        chunk = rows[i * shard_size : (i + 1) * shard_size]
        table = pa.Table.from_pylist(chunk, schema=schema)
        pq.write_table(table, split_dir / f"{split}-{i:05d}-of-{n_shards:05d}.parquet")


def corpus_is_complete(corpus_dir: str | Path, config_hash: str | None = None) -> bool:
    marker = Path(corpus_dir) / MARKER
    if not marker.is_file():
        return False
    return config_hash is None or json.loads(marker.read_text()).get("config_hash") == config_hash


def build_corpus(
    plan: Plan,
    out_dir: str | Path,
    *,
    seed: int = 0,
    name: str | None = None,
    sampling_rate: int = SAMPLING_RATE,
    shard_size: int = 100,
    num_workers: int = 2,
    noise: Noise | None = None,
    splits: Sequence[str] | None = None,
) -> Path:
    """Synthesise `plan` into `out_dir/<name>/<split>/*.parquet` (name defaults to the spec's).

    Skips the work when the directory is complete for the same config; otherwise builds into a
    temporary sibling directory and swaps it in only when every split and the marker are written.
    Threads, not processes: the work is in TTS subprocesses and C codecs, which release the GIL.
    """
    spec = plan.spec
    name = name or spec.name
    if sampling_rate != SAMPLING_RATE:
        raise CorpusConfigError(f"sampling_rate: corpora are stored at 16000 Hz, got {sampling_rate}")
    if shard_size < 1:
        raise CorpusConfigError(f"shard_size: must be >= 1, got {shard_size}")
    if splits is not None:
        plan = Plan(spec, {s: items for s, items in plan.splits.items() if s in splits})
    longform = spec.kind == "longform"
    render = Render(
        engine=spec.engine,
        rate=spec.rate,
        sampling_rate=sampling_rate,
        noise=noise,
        seed=seed,
        pause_s=spec.pause_s if longform else 0.0,
        min_duration_s=spec.min_duration_s if longform else 0.0,
        max_duration_s=spec.max_duration_s if longform else 0.0,
    )
    config_hash = _config_hash(plan, render, shard_size)
    final = Path(out_dir) / name
    if corpus_is_complete(final, config_hash):
        log.info("corpus %s is up to date at %s", name, final)
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        counts = {}
        with ThreadPoolExecutor(max_workers=max(1, num_workers)) as pool:
            for split, items in plan.splits.items():
                if not items:  # a split sized 0 is left out of the corpus
                    continue
                rows = list(
                    tqdm(
                        pool.map(lambda item: render_item(item, render), items),
                        total=len(items),
                        desc=f"{name}/{split}",
                        unit="rec" if longform else "utt",
                    )
                )
                _write_split(rows, tmp / split, split, shard_size)
                counts[split] = {"rows": len(rows), "hours": sum(r["duration"] for r in rows) / 3600}
        marker = {"config_hash": config_hash, "format": FORMAT_VERSION, "name": name, "splits": counts}
        (tmp / MARKER).write_text(json.dumps(marker, indent=2, sort_keys=True) + "\n")
        old = final.parent / f".{name}.old-{os.getpid()}"
        if final.exists():
            final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("built corpus %s at %s: %s", name, final, counts)
    return final


def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    if isinstance(value, (str, int, float)):
        return [value]
    return list(value)


def plan_all(cfg: Mapping[str, Any]) -> dict[str, Plan]:
    """Validate the whole config and plan every corpus; all errors surface before any synthesis."""
    seed = int(cfg.get("seed", 0))
    corpora = dict(cfg.get("corpora") or {})
    if not corpora:
        raise CorpusConfigError("corpora: no corpus configured")
    specs = [parse_spec(str(name), raw) for name, raw in corpora.items()]
    pools = partition_sentences(
        load_sentences(cfg.get("sentences")), dict(cfg.get("sentence_pools") or {}), seed
    )
    train_voices = {(s.engine, v) for s in specs for v in s.voices.get("train", [])}
    for spec in specs:
        leaked = sorted(v for v in spec.voices.get("test", []) if (spec.engine, v) in train_voices)
        if leaked:
            raise CorpusConfigError(
                f"corpora.{spec.name}.voices.test: {leaked} are train voices of another corpus; "
                f"test voices must be held out"
            )
    plans = {spec.name: plan_corpus(spec, pools, seed) for spec in specs}
    for name, plan in plans.items():
        if not any(plan.splits.values()):
            raise CorpusConfigError(
                f"corpora.{name}.sizes: every split is empty; give a split a size > 0 or leave the corpus out"
            )
    return plans


def noise_variants(cfg: Mapping[str, Any], names: Sequence[str]) -> list[tuple[str, Noise]]:
    """(corpus, Noise) pairs asked for by `noise.{type, snr_db, corpora}`; empty when snr_db is null."""
    noise_cfg = dict(cfg.get("noise") or {})
    levels = [float(x) for x in _as_list(noise_cfg.get("snr_db"))]
    kinds = [str(x) for x in _as_list(noise_cfg.get("type", "white"))]
    for kind in kinds:
        if kind not in NOISE_TYPES:
            raise CorpusConfigError(f"noise.type: unknown noise type {kind!r}; choose from {NOISE_TYPES}")
    targets = [str(x) for x in _as_list(noise_cfg.get("corpora"))] or list(names)
    unknown = sorted(set(targets) - set(names))
    if unknown:
        raise CorpusConfigError(f"noise.corpora: {unknown} are not configured corpora ({list(names)})")
    return [(name, Noise(kind, snr)) for name in targets for kind in kinds for snr in levels]


def build_all(cfg: Mapping[str, Any]) -> dict[str, Path]:
    """Build every configured corpus (and noisy variants) under `cfg.out_dir`; returns name -> path."""
    if isinstance(cfg, DictConfig):
        cfg = OmegaConf.to_container(cfg, resolve=True)
    out_dir = cfg.get("out_dir")
    if not out_dir:
        raise CorpusConfigError("out_dir: where to write the corpora is not set")
    plans = plan_all(cfg)
    variants = noise_variants(cfg, list(plans))
    noise_splits = _as_list((cfg.get("noise") or {}).get("splits")) or None
    common = {
        "seed": int(cfg.get("seed", 0)),
        "sampling_rate": int(cfg.get("sampling_rate", SAMPLING_RATE)),
        "shard_size": int(cfg.get("shard_size", 100)),
        "num_workers": int(cfg.get("num_workers", 2)),
    }
    built = {name: build_corpus(plan, out_dir, **common) for name, plan in plans.items()}
    for name, noise in variants:
        variant = noisy_corpus_name(name, noise.type, noise.snr_db)
        built[variant] = build_corpus(
            plans[name], out_dir, name=variant, noise=noise, splits=noise_splits, **common
        )
    return built
