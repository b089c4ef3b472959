"""Training-step speed and peak memory of the distillation configurations, side by side.

    python benchmarks/train_step.py                       # tiny.en -> 4 enc / 2 dec student, batch 8, CPU fp32
    python benchmarks/train_step.py --dtypes fp32 bf16 --repeats 3   # both precisions, fastest of 3 runs each
    python benchmarks/train_step.py --teacher /dir --batch-size 32 --device cuda --dtypes bf16
    python benchmarks/train_step.py --configs longest-cache,longest-cache-frozen-embed --sentences-per-sample 10 --repeats 3

A full optimisation step is timed: collation (audio decoding + log-mel features, or reading cached encoder
states), the encoder(s), both decoders, the KD loss, backward and the AdamW step. Configurations:

  reference-448   the reference recipe's configuration: labels padded to 448 tokens, one shared (frozen)
                  encoder pass, logits at every position, CE from the model over all positions and KL over
                  the full [batch, 448, vocab] distributions then masked (as run_distillation.py), AdamW
  longest         distil: labels padded to the longest in the batch, logits and losses at label positions
                  only, one shared encoder pass, fused AdamW
  longest-2enc    as `longest`, but teacher and student each run their own encoder (no sharing)
  longest-cache   as `longest`, second epoch of the encoder-output cache: states read from disk (fp16),
                  no audio decoding, no features, no encoder
  longest-cache-frozen-embed   as `longest-cache`, with model.freeze_embed_tokens and freeze_embed_positions:
                  the token embeddings (tied to the output layer) get no gradient and no AdamW update

Each configuration runs in its own subprocess so that peak memory (max RSS on CPU, max allocated on
GPU) is its own. With --repeats N every configuration runs N times, interleaved with the others, and the
fastest run counts (other processes on a shared machine only ever add time). bf16 means autocast, as in
Lightning's `bf16-mixed`: fp32 weights and optimizer, bf16 matmuls (fast on CPUs with AMX/AVX512-BF16).
Speed-ups are against the reference configuration at the same precision. Output: a markdown table
(and --json for machines).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CONFIGS = ("reference-448", "longest", "longest-2enc", "longest-cache", "longest-cache-frozen-embed")
SENTENCES = [
    "the birch canoe slid on the smooth planks",
    "glue the sheet to the dark blue background",
    "it is easy to tell the depth of a well",
    "these days a chicken leg is a rare dish",
    "rice is often served in round bowls",
    "the juice of lemons makes fine punch",
    "the box was thrown beside the parked truck",
    "the hogs were fed chopped corn and garbage",
    "four hours of steady work faced us",
    "a large size in stockings is hard to sell",
    "the boy was there when the sun rose",
    "a rod is used to catch pink salmon",
    "the source of the huge river is the clear spring",
    "kick the ball straight and follow through",
    "help the woman get back to her feet",
    "a pot of tea helps to pass the evening",
]


def rows(tokenizer, n: int, sentences_per_sample: int = 1) -> list[dict]:
    """Synthetic speech (espeak-ng) with its text as the pseudo-label: realistic audio and label lengths.

    `sentences_per_sample` > 1 concatenates that many sentences of one voice into a sample, as packing does
    (10 sentences: ~25 s and ~130 label tokens, the demo recipe's packed segments)."""
    import numpy as np

    from distil.data.audio import encode_flac
    from distil.data.tts import synthesize

    out = []
    for i in range(n):
        voice = ["en-us", "en-gb", "en+f2", "en-us+m3"][i % 4]
        parts = [SENTENCES[(i + j) % len(SENTENCES)] for j in range(sentences_per_sample)]
        wave = np.concatenate([synthesize(part, "espeak-ng", voice) for part in parts])
        text = ". ".join(parts)
        out.append(
            {
                "audio": {"bytes": encode_flac(wave, 16000), "path": None},
                "sample_id": f"clip{i}",
                "source": "bench/train",
                "token_ids": list(tokenizer(" " + text.capitalize() + ".").input_ids),
                "text": text,
            }
        )
    return out


def pad_to(batch: dict, length: int, pad_id: int) -> dict:
    import torch

    n, t = batch["labels"].shape
    if t >= length:
        return batch
    extra = length - t
    batch = dict(batch)
    batch["labels"] = torch.cat([batch["labels"], torch.full((n, extra), -100)], 1)
    batch["decoder_input_ids"] = torch.cat([batch["decoder_input_ids"], torch.full((n, extra), pad_id)], 1)
    batch["decoder_attention_mask"] = torch.cat(
        [batch["decoder_attention_mask"], torch.zeros(n, extra, dtype=torch.long)], 1
    )
    return batch


def reference_loss(module, batch, temperature: float = 2.0):
    """The reference script's loss computation, on the same shared encoder output."""
    import torch
    import torch.nn.functional as F

    with torch.no_grad():
        enc = module.student.model.encoder(batch["input_features"]).last_hidden_state
    labels, inputs = batch["labels"], batch["decoder_input_ids"]
    student = module.student(encoder_outputs=(enc,), decoder_input_ids=inputs, labels=labels)
    with torch.no_grad():
        teacher = module.teacher(encoder_outputs=(enc,), decoder_input_ids=inputs)
    teacher_dist = F.softmax(teacher.logits / temperature, dim=-1)
    student_dist = F.log_softmax(student.logits / temperature, dim=-1)
    kl = F.kl_div(student_dist, teacher_dist, reduction="none").sum(-1)
    mask = labels != -100
    kl = (kl * mask).sum() / mask.sum() * temperature**2
    return 0.8 * student.loss + 1.0 * kl


def run_one(args) -> dict:
    import torch
    from transformers import WhisperFeatureExtractor, WhisperTokenizerFast

    from distil.data.encoder_cache import EncoderCache
    from distil.datamodules.collator import SpeechCollator
    from distil.modules.distiller import WhisperDistiller

    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    config = args.config
    tok = WhisperTokenizerFast.from_pretrained(args.student)
    fe = WhisperFeatureExtractor.from_pretrained(args.student)
    data = rows(tok, args.batch_size * (args.steps + args.warmup), args.sentences_per_sample)
    module = WhisperDistiller(
        args.student,
        args.teacher,
        full_logits=config == "reference-448",
        share_encoder=False if config == "longest-2enc" else None,
        freeze_embed_tokens=config == "longest-cache-frozen-embed",
        freeze_embed_positions=config == "longest-cache-frozen-embed",
    ).to(device)
    module.train()
    cache = None
    if config.startswith("longest-cache"):
        cache = EncoderCache(tempfile.mkdtemp(prefix="bench-cache-"), module.encoder_fingerprint())
        module.set_encoder_cache(cache)
    collator = SpeechCollator(fe, tok, encoder_cache=cache, seed=0)
    trainable = [p for p in module.student.parameters() if p.requires_grad]
    # The reference uses torch's default AdamW; distil uses the fused one (see WhisperDistiller._use_fused).
    optimizer = torch.optim.AdamW(trainable, lr=1e-5, fused=None if config == "reference-448" else True)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.dtype == "bf16")

    batches = [data[i : i + args.batch_size] for i in range(0, len(data), args.batch_size)]
    if cache is not None:  # the first epoch fills the cache (not timed): this measures the epochs after it
        for b in batches:
            batch = collator(b, epoch=0)
            with torch.no_grad(), autocast:
                module.compute_loss(batch)

    def step(b) -> tuple[float, int]:
        batch = collator(b, epoch=1)
        if config == "reference-448":
            batch = pad_to(batch, 448, collator.pad_id)
        with autocast:
            loss = (
                reference_loss(module, batch) if config == "reference-448" else module.compute_loss(batch)[0]
            )
        loss.backward()
        torch.nn.utils.clip_grad_norm_(module.student.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss), int((batch["labels"] != -100).sum())

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for b in batches[: args.warmup]:
        step(b)
    if device.type == "cuda":
        torch.cuda.synchronize()
    times, tokens = [], 0
    for b in batches[args.warmup :]:
        t0 = time.perf_counter()
        _, n_tok = step(b)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        tokens += n_tok
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux -> MiB
    mean = sorted(times)[len(times) // 2]  # median: robust to other processes on a shared CPU
    return {
        "config": config,
        "seconds_per_step": mean,
        "samples_per_s": args.batch_size / mean,
        "label_tokens_per_step": tokens / len(times),
        "peak_memory_mib": peak,
        "steps_timed": len(times),
    }


def run_config(args, config: str, dtype: str) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--config",
        config,
        "--teacher",
        args.teacher,
        "--student",
        args.student,
        "--batch-size",
        str(args.batch_size),
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
        "--device",
        args.device,
        "--dtype",
        dtype,
        "--threads",
        str(args.threads),
        "--sentences-per-sample",
        str(args.sentences_per_sample),
    ]
    proc = subprocess.run(
        cmd, capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    )
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if line is None:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
        raise SystemExit(f"configuration {config} failed")
    return json.loads(line[len("RESULT ") :])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--teacher", help="teacher HF directory (default: tiny.en imported under $DISTIL_HOME)"
    )
    parser.add_argument(
        "--student", help="student HF directory (default: tiny.en -> whole encoder + 2 decoder layers)"
    )
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per configuration")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="run every configuration N times, interleaved; keep the fastest",
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtypes", nargs="+", default=["fp32"], choices=["fp32", "bf16"])
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument(
        "--sentences-per-sample", type=int, default=1, help="10: packed segments like the demo's (~25 s)"
    )
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--config", help=argparse.SUPPRESS)  # internal: run one configuration
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()

    if args.config:
        print("RESULT " + json.dumps(run_one(args)))
        return
    if not args.teacher or not args.student:
        from distil.utils.paths import distil_home
        from distil.whisper.models import resolve_model
        from distil.whisper.student import init_student

        args.teacher = args.teacher or resolve_model(
            {
                "_target_": "distil.whisper.sources.PackagedCT2",
                "name": "whisper-tiny.en",
                "checkpoint": "tiny.en",
            }
        )
        args.student = args.student or str(
            init_student(args.teacher, distil_home() / "students" / "whisper-tiny.en-dec2", decoder_layers=2)
        )
    best: dict[tuple[str, str], dict] = {}
    runs: dict[tuple[str, str], list[float]] = {}
    for _ in range(args.repeats):  # interleaved, so a busy period of the machine hits every configuration
        for dtype in args.dtypes:
            for config in args.configs.split(","):
                r = run_config(args, config, dtype)
                key = (dtype, config)
                runs.setdefault(key, []).append(r["seconds_per_step"])
                if key not in best or r["seconds_per_step"] < best[key]["seconds_per_step"]:
                    best[key] = r
                print(f"  {dtype} {config}: {r['seconds_per_step']:.2f} s/step", file=sys.stderr)
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(
        f"\nbatch {args.batch_size}, {args.device}, torch threads {args.threads or 'default'}, "
        f"teacher {Path(args.teacher).name}, student {Path(args.student).name}, fastest of {args.repeats} "
        f"interleaved run(s) of {args.steps} timed step(s) (median step), load average {load} "
        f"on {os.cpu_count()} CPUs\n"
    )
    print(
        "| precision | configuration | s/step | runs (s/step) | samples/s | speed-up | label tokens/step | peak memory (MiB) |"
    )
    print("|---|---|---:|---|---:|---:|---:|---:|")
    results = []
    for (dtype, config), r in best.items():
        base = best.get((dtype, "reference-448"), r)
        r["dtype"] = dtype
        r["speedup_vs_reference"] = r["samples_per_s"] / base["samples_per_s"]
        results.append(r)
        print(
            f"| {dtype} | {config} | {r['seconds_per_step']:.2f} | {' '.join(f'{t:.2f}' for t in runs[(dtype, config)])} "
            f"| {r['samples_per_s']:.2f} | {r['speedup_vs_reference']:.1f}x | {r['label_tokens_per_step']:.0f} "
            f"| {r['peak_memory_mib']:.0f} |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
