"""Pseudo-labelling throughput: the distil stage vs `transformers.pipeline("automatic-speech-recognition")`.

Same teacher (tiny.en by default), same clips, same greedy settings. For the stage, the time is
`Trainer.predict` end to end (FLAC decoding, features, generation, parquet shards); for the pipeline only
the call on already decoded arrays. Prints a markdown table (audio-seconds per second) and whether the
transcripts are identical.

    python benchmarks/pseudo_label.py                       # 64 clips, batch sizes 8 16 32
    python benchmarks/pseudo_label.py --clips 128 --batch-sizes 16 32 64 --out table.md

Data: the synthetic corpus train splits (`${DISTIL_HOME}/corpora/{espeak,flite}/train`) when they exist,
else clips spoken on the fly with espeak-ng and flite.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import datasets
import numpy as np
import pyarrow.parquet as pq
import torch
from omegaconf import OmegaConf

from distil.audio import decode_audio, encode_flac
from distil.data import DatasetEntry, load_split
from distil.paths import CONF_DIR, distil_home

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
    from distil.tts import synthesize

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


def run_stage(data_dir: Path, home: Path, batch_size: int, teacher: str, num_beams: int, max_new_tokens: int):
    from distil.pseudo_label import pseudo_label

    cfg = OmegaConf.load(CONF_DIR / "pseudo_label.yaml")
    for key in ("defaults", "hydra"):
        cfg.pop(key)
    cfg.paths = OmegaConf.load(CONF_DIR / "paths" / "default.yaml")
    cfg.paths.root = str(home)
    cfg.paths.models = str(distil_home() / "models")  # reuse the imported teacher
    cfg.teacher = OmegaConf.load(CONF_DIR / "teacher" / f"{teacher}.yaml")
    cfg.data = {"datasets": [{"name": "bench", "path": str(data_dir), "splits": ["train"]}]}
    cfg.batch_size = batch_size
    cfg.generation.num_beams = num_beams
    cfg.generation.max_new_tokens = max_new_tokens
    cfg.progress_bar = False
    cfg.output_dir = str(home / f"out-{batch_size}")
    summary = pseudo_label(cfg, run_dir=home / f"run-{batch_size}")
    split = summary["splits"]["bench/train"]
    texts = {}
    for f in sorted(Path(split["output_dir"]).glob("part-*.parquet")):
        t = pq.read_table(f, columns=["id", "pseudo_label"]).to_pydict()
        texts.update(zip(t["id"], t["pseudo_label"], strict=True))
    return split["this_run"]["audio_seconds_per_second"], texts


def run_pipeline(
    rows: list[dict], waves: list[np.ndarray], batch_size: int, pipe, num_beams: int, max_new_tokens: int
):
    inputs = [{"raw": w, "sampling_rate": 16000} for w in waves]
    started = time.perf_counter()
    # transformers 5's pipeline defaults to num_beams=5, max_new_tokens=256: pass the stage's settings.
    out = pipe(
        inputs,
        batch_size=batch_size,
        generate_kwargs={"num_beams": num_beams, "max_new_tokens": max_new_tokens},
    )
    seconds = time.perf_counter() - started
    audio = sum(len(w) for w in waves) / 16000
    return audio / seconds, {r["id"]: o["text"].strip() for r, o in zip(rows, out, strict=True)}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clips", type=int, default=64)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 16, 32])
    parser.add_argument("--pipeline-batch-sizes", type=int, nargs="+", default=[8, 16, 32])
    parser.add_argument("--teacher", default="tiny_en")
    parser.add_argument("--num-beams", type=int, default=1, help="1 = greedy (the stage's default)")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--out", type=Path, default=None, help="also write the table to this file")
    args = parser.parse_args()

    from transformers import pipeline

    from distil.models import resolve_model

    teacher_cfg = OmegaConf.load(CONF_DIR / "teacher" / f"{args.teacher}.yaml")
    model_dir = resolve_model(teacher_cfg, models_root=distil_home() / "models")
    rows = corpus_rows(args.clips)
    source = "synthetic corpus (espeak + flite train)"
    if rows is None:
        rows, source = tts_rows(args.clips), "TTS clips (espeak-ng + flite), corpus not built"
    waves = [decode_audio(r["audio"]) for r in rows]
    audio_seconds = sum(len(w) for w in waves) / 16000

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        data_dir = home / "data"
        (data_dir / "train").mkdir(parents=True)
        ds = datasets.Dataset.from_list(rows).cast_column("audio", datasets.Audio(decode=False))
        ds.to_parquet(str(data_dir / "train" / "part-0.parquet"))

        pipe = pipeline("automatic-speech-recognition", model=model_dir, device="cpu", dtype=torch.float32)
        gen = (args.num_beams, args.max_new_tokens)
        run_pipeline(rows[:2], waves[:2], 2, pipe, *gen)  # warm-up
        run_stage(
            data_dir, home / "warmup", args.batch_sizes[0], args.teacher, *gen
        )  # warm-up (imports, threads)
        # Interleave the two systems so that a change of machine load affects both alike.
        jobs = [("pipe", b) for b in args.pipeline_batch_sizes] + [("stage", b) for b in args.batch_sizes]
        jobs.sort(key=lambda j: (j[1], j[0]))
        for kind, bs in jobs:
            if kind == "pipe":
                rate, texts = run_pipeline(rows, waves, bs, pipe, *gen)
                results.append(("transformers pipeline", bs, rate, texts))
            else:
                rate, texts = run_stage(data_dir, home / f"stage-{bs}", bs, args.teacher, *gen)
                results.append(("distil pseudo_label", bs, rate, texts))
            print(f"{results[-1][0]} batch {bs}: {rate:.2f} audio-s/s", flush=True)

    best_pipe = max((r for r in results if r[0].startswith("transformers")), key=lambda r: r[2])
    lines = [
        f"Teacher {args.teacher} ({model_dir}), num_beams={args.num_beams}, max_new_tokens={args.max_new_tokens}; "
        f"{len(rows)} clips, {audio_seconds:.1f} s of audio from {source}; "
        f"CPU threads {torch.get_num_threads()}, cores {os.cpu_count()}.",
        "",
        "| system | batch size | audio-s/s | vs best pipeline | transcripts identical to best pipeline |",
        "|---|---|---|---|---|",
    ]
    for name, bs, rate, texts in results:
        same = sum(texts[k] == best_pipe[3][k] for k in best_pipe[3])
        lines.append(
            f"| {name} | {bs} | {rate:.2f} | {rate / best_pipe[2]:.2f}x | {same}/{len(best_pipe[3])} |"
        )
    table = "\n".join(lines)
    print("\n" + table)
    for name, bs, _, texts in results:
        diff = [k for k in best_pipe[3] if texts[k] != best_pipe[3][k]]
        for k in diff[:3]:
            print(f"  differs ({name} b{bs}) {k}: {texts[k]!r} vs pipeline {best_pipe[3][k]!r}")
    if args.out:
        args.out.write_text(table + "\n")


if __name__ == "__main__":
    main()
