"""Deployment speed: teacher and student, PyTorch fp32 against CTranslate2 (faster-whisper's runtime).

The teacher (tiny.en by default) and a student made from it (its whole encoder, 2 decoder layers,
`distil.whisper.student.init_student`; untrained is fine for speed, or `--student <dir>`: a distilled one, e.g.
a `make demo` run's `<run dir>/best`) run greedy short-form decoding on the same
clips through PyTorch fp32 and through their CTranslate2 exports (`distil.whisper.ct2_export`) at each
`--compute-types`. Latency is the evaluation's (`distil.evaluation`: features beforehand, only generation
timed, tokens up to and including end-of-text); every configuration runs `--repeats` times, interleaved
(machine load changes affect all alike), and the table reports medians. WER is against the spoken text
(Whisper's English normaliser); "identical" counts clips whose transcript equals the same model's PyTorch
fp32 transcript (batch 8).

    python benchmarks/deploy.py --clips 32 --batch-sizes 1 8 --repeats 3 --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from distil.data.text import corpus_wer, english_normalizer
from distil.data.tts import synthesize
from distil.evaluation.ct2_backend import load_ct2
from distil.evaluation.latency import measure_latency
from distil.utils.paths import CONF_DIR
from distil.whisper.generation import generation_kwargs
from distil.whisper.loading import load_model
from distil.whisper.models import resolve_model
from distil.whisper.student import init_student

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Please call Stella and ask her to bring these things with her from the store.",
    "It is a sunny day.",
    "We also need a small plastic snake and a big toy frog for the kids.",
    "Good morning.",
    "Knowledge distillation trains a small student model to imitate a large teacher.",
    "The weather will be cold tomorrow with a chance of rain in the evening.",
    "Numbers such as seventeen, forty two and one hundred are spoken aloud.",
]
VOICES = [("espeak-ng", "en-us"), ("flite", "slt"), ("espeak-ng", "en-gb+m3"), ("flite", "awb")]


def clips(n: int) -> list[tuple[np.ndarray, str]]:
    out = []
    for i in range(n):
        engine, voice = VOICES[i % len(VOICES)]
        text = SENTENCES[i % len(SENTENCES)]
        out.append((np.asarray(synthesize(text, engine, voice, sampling_rate=16_000), np.float32), text))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", default="tiny_en", help="a conf/teacher/<name> config")
    ap.add_argument("--decoder-layers", type=int, default=2)
    ap.add_argument(
        "--student", type=Path, default=None, help="a trained student directory (default: untrained)"
    )
    ap.add_argument("--clips", type=int, default=32)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--compute-types", nargs="+", default=["float32", "int8"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    data = clips(args.clips)
    waves, refs = [w for w, _ in data], [t for _, t in data]
    work = Path(tempfile.mkdtemp(prefix="distil-deploy-"))
    teacher_dir = resolve_model(OmegaConf.load(CONF_DIR / "teacher" / f"{args.teacher}.yaml"))
    student_dir = args.student or init_student(
        teacher_dir, work / "student", decoder_layers=args.decoder_layers
    )
    systems = {}  # (model, backend) -> (transcribe(batch) -> texts, latency(batch sizes) -> dict)
    for role, model_dir in (("teacher", teacher_dir), ("student", student_dir)):
        whisper = load_model({"path": str(model_dir), "name": role}, device="cpu", dtype="float32")
        gen = generation_kwargs(whisper.model, "en", None, args.max_new_tokens)
        systems[(role, "PyTorch fp32")] = (
            lambda b, whisper=whisper: [
                t.text for t in whisper.transcribe(waves, b, "en", None, args.max_new_tokens)
            ],
            lambda sizes, whisper=whisper, gen=gen: measure_latency(
                whisper.model, whisper.processor, waves, sizes, 1, 1, gen
            ),
        )
        for q in args.compute_types:
            ct2 = load_ct2(whisper, work / f"{role}-ct2-{q}", q, threads=args.threads)
            systems[(role, f"CTranslate2 {q}")] = (
                lambda b, ct2=ct2: [
                    t.text for t in ct2.transcribe(waves, b, "en", None, args.max_new_tokens)
                ],
                lambda sizes, ct2=ct2: ct2.measure_latency(
                    waves, sizes, 1, 1, "en", None, args.max_new_tokens
                ),
            )

    runs: dict = {key: [] for key in systems}
    for _ in range(args.repeats):  # interleaved: one run of every configuration per round
        for key, (_, latency) in systems.items():
            runs[key].append(latency(args.batch_sizes)["batch_sizes"])
    texts = {key: transcribe(8) for key, (transcribe, _) in systems.items()}

    lines = [
        "| model | backend | batch size | RTFx (median) | decoder tokens/s (median) | RTFx runs | WER % "
        "| identical to PyTorch fp32 |",
        "|---|---|---:|---:|---:|---|---:|---:|",
    ]
    for (role, backend), by_run in runs.items():
        reference = texts[(role, "PyTorch fp32")]
        wer = corpus_wer(refs, texts[(role, backend)], english_normalizer()).wer
        same = sum(a == b for a, b in zip(texts[(role, backend)], reference, strict=True))
        for b in args.batch_sizes:
            rtfx = [r[str(b)]["rtfx"] for r in by_run]
            tps = statistics.median(r[str(b)]["tokens_per_second"] for r in by_run)
            lines.append(
                f"| {role} | {backend} | {b} | {statistics.median(rtfx):.2f} | {tps:.0f} | "
                f"{' '.join(f'{x:.2f}' for x in rtfx)} | {wer:.1f} | {same}/{len(waves)} |"
            )
    print("\n".join(lines))


if __name__ == "__main__":
    main()
