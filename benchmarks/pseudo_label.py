"""Pseudo-labelling throughput: the distil stage vs `transformers.pipeline("automatic-speech-recognition")`.

Same teacher (tiny.en by default), same clips, same greedy settings. For the stage, the time is
`Trainer.predict` end to end (process start-up, FLAC decoding, features, generation, parquet shards); for the
pipeline only the call on already decoded arrays. The stage runs with its default config (on CPU:
`trainer.devices=auto`, one single-threaded process per core), except for `shard_size` (default here 16:
64 clips at the default 1000 would make a single shard, which one process labels alone; real datasets have
many shards). The pipeline runs once per `--pipeline-threads` value (torch intra-op threads) and per batch
size; the best of those is the baseline. Every configuration runs `--repeats` times, interleaved (machine
load changes affect all alike), and the table reports medians. Prints a markdown table (audio-seconds per
second), the WER of each system's transcripts against the spoken text (Whisper's English normaliser) and
whether the transcripts are identical to the best pipeline at each precision. `--dtypes fp32 bf16` runs
both systems at both precisions: bf16 is much faster on CPUs with AMX/AVX512-BF16 but its greedy output
is not identical to fp32's.

    python benchmarks/pseudo_label.py                       # 64 clips, batch sizes 8 16 32
    python benchmarks/pseudo_label.py --clips 96 --batch-sizes 16 32 --repeats 3 --out table.md

Data: the synthetic corpus train splits (`${DISTIL_HOME}/corpora/{espeak,flite}/train`) when they exist,
else clips spoken on the fly with espeak-ng and flite.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import datasets
import numpy as np
import pyarrow.parquet as pq
import torch
from omegaconf import OmegaConf

from distil.data.audio import decode_audio, encode_flac
from distil.data.entries import DatasetEntry, load_split
from distil.data.text import corpus_wer, english_normalizer
from distil.utils.paths import CONF_DIR, distil_home

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Please call Stella and ask her to bring these things with her from the store.",
    "It is a sunny day.",
    "Six spoons of fresh snow peas, five thick slabs of blue cheese, and maybe a snack for her brother Bob.",
    "We also need a small plastic snake and a big toy frog for the kids.",
    "Good morning.",
    "She can scoop these things into three red bags, and we will go meet her Wednesday at the train station.",
    "Knowledge distillation trains a small student model to imitate a large teacher.",
    "The weather will be cold tomorrow with a chance of rain in the evening.",
    "Thank you very much.",
    "Numbers such as seventeen, forty two and one hundred are spoken aloud.",
    "A journey of a thousand miles begins with a single step.",
]
VOICES = [
    ("espeak-ng", "en-us"),
    ("espeak-ng", "en-gb+m3"),
    ("flite", "slt"),
    ("flite", "kal"),
    ("espeak-ng", "en+f2"),
]


def corpus_rows(n: int) -> list[dict] | None:
    rows = []
    for name in ("espeak", "flite"):
        root = distil_home() / "corpora" / name
        if not (root / "train").is_dir():
            return None
        ds = load_split(DatasetEntry(name=name, path=str(root)), "train")
        rows += ds.select(range(min(n // 2 + n % 2, len(ds)))).to_list()
    return rows[:n]


def tts_rows(n: int) -> list[dict]:
    from distil.data.tts import synthesize

    rows = []
    for i in range(n):
        engine, voice = VOICES[i % len(VOICES)]
        text = SENTENCES[(i * 7) % len(SENTENCES)]
        wave = synthesize(text, engine, voice)
        audio = {"bytes": encode_flac(wave, 16000), "path": None}
        rows.append(
            {
                "audio": audio,
                "text": text,
                "id": f"tts-{i:04d}",
                "speaker": voice,
                "duration": len(wave) / 16000,
            }
        )
    return rows


def run_stage(
    data_dir: Path,
    home: Path,
    batch_size: int,
    teacher: str,
    num_beams: int,
    max_new_tokens: int,
    shard_size: int,
    devices: str,
    dtype: str = "fp32",
):
    from distil.pseudo_label import pseudo_label

    cfg = OmegaConf.load(CONF_DIR / "pseudo_label.yaml")
    cfg.pop("defaults")
    cfg.paths = OmegaConf.load(CONF_DIR / "paths" / "default.yaml")
    cfg.paths.root = str(home)
    cfg.paths.models = str(distil_home() / "models")  # reuse the imported teacher
    cfg.teacher = OmegaConf.load(CONF_DIR / "teacher" / f"{teacher}.yaml")
    cfg.data = {"datasets": [{"name": "bench", "path": str(data_dir), "splits": ["train"]}]}
    cfg.batch_size = batch_size
    cfg.generation.num_beams = num_beams
    cfg.generation.max_new_tokens = max_new_tokens
    cfg.progress_bar = False
    cfg.dtype = dtype
    cfg.shard_size = shard_size
    cfg.trainer.devices = devices if devices == "auto" else int(devices)
    cfg.out_dir = str(home / "out")
    summary = pseudo_label(cfg, run_dir=home / "run")
    split = summary["splits"]["bench/train"]
    texts = {}
    for f in sorted(Path(split["out_dir"]).glob("part-*.parquet")):
        t = pq.read_table(f, columns=["id", "pseudo_label"]).to_pydict()
        texts.update(zip(t["id"], t["pseudo_label"], strict=True))
    return split["this_run"]["audio_seconds_per_second"], texts


def run_pipeline(
    rows: list[dict],
    waves: list[np.ndarray],
    batch_size: int,
    pipe,
    num_beams: int,
    max_new_tokens: int,
    threads: int | None = None,
):
    inputs = [{"raw": w, "sampling_rate": 16000} for w in waves]
    saved = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    started = time.perf_counter()
    # transformers 5's pipeline defaults to num_beams=5, max_new_tokens=256: pass the stage's settings.
    out = pipe(
        inputs,
        batch_size=batch_size,
        generate_kwargs={"num_beams": num_beams, "max_new_tokens": max_new_tokens},
    )
    seconds = time.perf_counter() - started
    torch.set_num_threads(saved)
    audio = sum(len(w) for w in waves) / 16000
    return audio / seconds, {r["id"]: o["text"].strip() for r, o in zip(rows, out, strict=True)}


def run_encoder_bound(waves: list[np.ndarray], batch_size: int, pipe, processes: int) -> float:
    """Audio-s/s of the Whisper encoder alone, one thread, spread perfectly over `processes` cores.

    Both systems must run this encoder pass on every clip (30-s padded features) at the same precision, so
    no labelling system with the same output can beat this rate: it bounds the achievable speed-up."""
    features = pipe.feature_extractor(waves, sampling_rate=16000, return_tensors="pt").input_features
    features = features.to(pipe.model.dtype)
    encoder = pipe.model.get_encoder()
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    with torch.inference_mode():
        started = time.perf_counter()
        for i in range(0, len(features), batch_size):
            encoder(features[i : i + batch_size])
        seconds = time.perf_counter() - started
    torch.set_num_threads(saved)
    return sum(len(w) for w in waves) / 16000 / (seconds / processes)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clips", type=int, default=64)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 16, 32])
    parser.add_argument("--pipeline-batch-sizes", type=int, nargs="+", default=[8, 16, 32])
    parser.add_argument(
        "--pipeline-threads", type=int, nargs="+", default=[1, 2], help="torch threads for the pipeline"
    )
    parser.add_argument(
        "--stage-devices", nargs="+", default=["auto"], help="trainer.devices values for the stage"
    )
    parser.add_argument(
        "--dtypes",
        nargs="+",
        default=["fp32", "bf16"],
        choices=["fp32", "bf16"],
        help="teacher precision; each runs for both systems (bf16 is fast on CPUs with AMX/AVX512-BF16)",
    )
    parser.add_argument(
        "--no-encoder-bound",
        action="store_true",
        help="skip measuring the encoder-only upper bound (the encoder alone, one thread per core)",
    )
    parser.add_argument("--shard-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=1, help="runs per configuration (median reported)")
    parser.add_argument("--teacher", default="tiny_en")
    parser.add_argument("--num-beams", type=int, default=1, help="1 = greedy (the stage's default)")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--out", type=Path, default=None, help="also write the table to this file")
    args = parser.parse_args()

    from transformers import pipeline

    from distil.whisper.models import resolve_model

    teacher_cfg = OmegaConf.load(CONF_DIR / "teacher" / f"{args.teacher}.yaml")
    model_dir = resolve_model(teacher_cfg, models_root=distil_home() / "models")
    rows = corpus_rows(args.clips)
    source = "synthetic corpus (espeak + flite train)"
    if rows is None:
        rows, source = tts_rows(args.clips), "TTS clips (espeak-ng + flite), corpus not built"
    waves = [decode_audio(r["audio"]) for r in rows]
    audio_seconds = sum(len(w) for w in waves) / 16000

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load_start = os.getloadavg()[0]
    rates: dict[tuple, list[float]] = {}
    transcripts: dict[tuple, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        data_dir = home / "data"
        (data_dir / "train").mkdir(parents=True)
        ds = datasets.Dataset.from_list(rows).cast_column("audio", datasets.Audio(decode=False))
        ds.to_parquet(str(data_dir / "train" / "part-0.parquet"))

        torch_dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
        pipes = {
            d: pipeline("automatic-speech-recognition", model=model_dir, device="cpu", dtype=torch_dtypes[d])
            for d in args.dtypes
        }
        gen = (args.num_beams, args.max_new_tokens)
        for pipe in pipes.values():
            run_pipeline(rows[:2], waves[:2], 2, pipe, *gen)  # warm-up
        warm_rows = home / "warmup-data"
        (warm_rows / "train").mkdir(parents=True)
        ds.select(range(min(4, len(ds)))).to_parquet(str(warm_rows / "train" / "part-0.parquet"))
        run_stage(warm_rows, home / "warmup", 2, args.teacher, *gen, 1, args.stage_devices[0])  # imports
        # Interleave the systems so that a change of machine load affects all alike.
        jobs = [
            ("pipe", b, t, d)
            for d in args.dtypes
            for b in args.pipeline_batch_sizes
            for t in args.pipeline_threads
        ]
        jobs += [
            ("stage", b, n, d) for d in args.dtypes for b in args.batch_sizes for n in args.stage_devices
        ]
        if not args.no_encoder_bound:
            jobs += [("encoder", max(args.batch_sizes), cores, d) for d in args.dtypes]
        jobs.sort(key=lambda j: (j[3] != "fp32", j[3], j[0] == "encoder", j[1], j[0], str(j[2])))
        for repeat in range(args.repeats):
            for job in jobs:
                kind, bs, par, dtype = job
                if kind == "pipe":
                    rate, texts = run_pipeline(rows, waves, bs, pipes[dtype], *gen, threads=par)
                elif kind == "encoder":
                    rate, texts = run_encoder_bound(waves, bs, pipes[dtype], par), {}
                else:
                    run_home = home / f"stage-{bs}-{par}-{dtype}-{repeat}"
                    rate, texts = run_stage(
                        data_dir, run_home, bs, args.teacher, *gen, args.shard_size, par, dtype
                    )
                rates.setdefault(job, []).append(rate)
                transcripts.setdefault(job, texts)
                if texts != transcripts[job]:
                    print(f"  WARNING: {job} transcripts changed between repeats", flush=True)
                print(
                    f"[{repeat + 1}/{args.repeats}] {job}: {rate:.2f} audio-s/s, load {os.getloadavg()[0]:.1f}",
                    flush=True,
                )
    load_end = os.getloadavg()[0]

    median = {job: statistics.median(r) for job, r in rates.items()}
    pipe_jobs = [j for j in jobs if j[0] == "pipe"]
    best_pipe = max(pipe_jobs, key=median.get)
    # Reference transcripts: the best pipeline run at each precision (greedy output of one precision does not
    # depend on batch size or threads, which the table shows for the pipelines themselves).
    best_pipe_at = {d: max((j for j in pipe_jobs if j[3] == d), key=median.get) for d in args.dtypes}

    def name(job):
        kind, _, par, dtype = job
        if kind == "pipe":
            return f"transformers pipeline, {dtype}, {par} thread{'s' * (par != 1)}"
        if kind == "encoder":
            return f"bound: the encoder pass alone, {dtype}, 1 thread x {par} cores"
        return f"distil pseudo_label, {dtype}, trainer.devices={par}"

    normalizer = english_normalizer()
    references = {r["id"]: r["text"] for r in rows}

    def wer(job) -> str:
        ids = list(references)
        result = corpus_wer([references[i] for i in ids], [transcripts[job][i] for i in ids], normalizer)
        return f"{result.wer:.1f}"

    def same(job, ref_job):
        ref = transcripts[ref_job]
        return f"{sum(transcripts[job][k] == ref[k] for k in ref)}/{len(ref)}"

    dtype_cols = " | ".join(f"identical to best {d} pipeline" for d in args.dtypes)
    lines = [
        f"Teacher {args.teacher} ({model_dir}), num_beams={args.num_beams}, max_new_tokens={args.max_new_tokens}; "
        f"{len(rows)} clips, {audio_seconds:.1f} s of audio from {source}; {cores} CPU cores; "
        f"stage shard_size={args.shard_size}; median of {args.repeats} interleaved run(s); "
        f"1-min load average {load_start:.1f} at start, {load_end:.1f} at end. "
        f"Best pipeline: {name(best_pipe)}, batch {best_pipe[1]}.",
        "",
        f"| system | batch size | audio-s/s (median) | runs | vs best pipeline | WER % | {dtype_cols} |",
        "|---|---|---|---|---|---|" + "---|" * len(args.dtypes),
    ]
    for job in jobs:
        runs = " ".join(f"{r:.2f}" for r in rates[job])
        # The encoder bound has no transcripts: an upper bound on speed, not a system.
        bound = job[0] == "encoder"
        quality = ["-" if bound else wer(job)]
        quality += ["-" if bound else same(job, best_pipe_at[d]) for d in args.dtypes]
        lines.append(
            f"| {name(job)} | {job[1]} | {median[job]:.2f} | {runs} | {median[job] / median[best_pipe]:.2f}x "
            f"| {' | '.join(quality)} |"
        )
    table = "\n".join(lines)
    print("\n" + table)
    for job in (j for j in jobs if j[0] != "encoder"):
        ref = transcripts[best_pipe_at[job[3]]]
        diff = [k for k in ref if transcripts[job][k] != ref[k]]
        for k in diff[:3]:
            print(f"  differs ({name(job)} b{job[1]}) {k}: {transcripts[job][k]!r} vs pipeline {ref[k]!r}")
    if args.out:
        args.out.write_text(table + "\n")


if __name__ == "__main__":
    main()
