"""Quickstart A as a user runs it: the README's four commands (label, train, evaluate on the user's own test set,
export), taken from the README itself, on a small local audio folder (wavs + metadata.csv) with the tiny random
teacher on the CPU. Only what a GPU recipe cannot do here is substituted: the teacher, the precision, the
device and the number of steps."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import soundfile as sf
from helpers import WORDS, cli, wave

README = Path(__file__).resolve().parent.parent / "README.md"
SECTION = "## Quickstart A"

# What the CPU and the tiny random teacher need instead of the GPU recipe's settings.
REPLACE = {
    "teacher=large_v3": "teacher=tiny_random",
    "dtype=bf16": "dtype=fp32",
    "teacher.language=en": "",  # an English-only teacher takes no language
    "trainer.max_steps=20000": "trainer.max_steps=4",
}
EXTRA = {
    "pseudo-label": ["trainer.accelerator=cpu", "trainer.devices=1", "batch_size=4", "progress_bar=false"],
    "train": [
        "teacher=tiny_random",  # the experiment's large-v3
        "trainer=cpu",
        "trainer.precision=32-true",
        "trainer.val_check_interval=2",
        "data.batch_size=2",
        "data.max_val_samples=2",
        "data.streaming=false",
        "data.num_workers=0",
        "data.wer_threshold=null",  # random labels are all wrong: the recipe's 10 % filter would drop them all
        "trainer.enable_progress_bar=false",
    ],
    "evaluate": ["device=cpu", "eval.batch_size=4", "eval.max_new_tokens=16"],
    "export": [],
}


def quickstart_commands() -> list[list[str]]:
    text = README.read_text()
    section = text[text.index(SECTION) :]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    lines = re.sub(r"\\\n", " ", block).splitlines()
    return [shlex.split(line, comments=True) for line in lines if shlex.split(line, comments=True)]


def audio_folder(root: Path) -> None:
    """`root/{train,validation,test}/` of wav files with metadata.csv (file_name, transcription)."""
    for split, n in (("train", 8), ("validation", 2), ("test", 3)):
        (root / split).mkdir(parents=True)
        lines = ["file_name,transcription"]
        for i in range(n):
            seed = {"train": 0, "validation": 100, "test": 200}[split] + i
            sf.write(str(root / split / f"{split}-{i}.wav"), wave(1.0 + 0.3 * i, seed), 16000)
            lines.append(f"{split}-{i}.wav,{' '.join(WORDS[i : i + 4])}")
        (root / split / "metadata.csv").write_text("\n".join(lines) + "\n")


def test_quickstart_a_runs_end_to_end_on_an_audio_folder(tmp_path, tiny_random_dir):
    home = tmp_path / "home"
    (home / "models").mkdir(parents=True)
    for name in ("whisper-tiny-random", "whisper-tiny.en"):  # the random teacher borrows tiny.en's processor
        (home / "models" / name).symlink_to(Path(tiny_random_dir).parent / name)
    corpus, student = tmp_path / "my_corpus", tmp_path / "students" / "mine"
    audio_folder(corpus)

    commands = quickstart_commands()
    assert [c[0] for c in commands] == [
        "distil-pseudo-label",
        "distil-train",
        "distil-evaluate",
        "distil-export",
    ]
    for words in commands:
        args = []
        for word in words[1:]:
            word = REPLACE.get(word, word)
            word = word.replace("/data/my_corpus", str(corpus)).replace(
                "/data/students/my-distil-large-v3", str(student)
            )
            if word:
                args.append(word)
        stage = words[0].removeprefix("distil-")
        proc = cli(stage, *args, *EXTRA[stage], home=home, timeout=600)
        assert "Traceback" not in proc.stderr

    labels = home / "pseudo_labels" / "whisper-tiny-random" / "custom" / "train"
    assert (labels / "_SUCCESS").is_file()
    assert (student / "best" / "config.json").is_file()
    # the exported student carries the loop guards (transformers reads the compression ratio threshold)
    generation = json.loads((student / "best" / "generation_config.json").read_text())
    assert generation["compression_ratio_threshold"] == 1.35 and "logprob_threshold" not in generation
    assert generation["distil_loop_guards"]["temperature"] == [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
    metrics = json.loads(next((home / "runs" / "evaluate").glob("*/metrics.json")).read_text())
    # Only the user's test set is evaluated and averaged: the synthetic defaults are replaced, not added to.
    assert list(metrics["short_form"]["sets"]) == ["mine"]
    assert metrics["short_form"]["sets"]["mine"]["samples"] == 3
    assert metrics["short_form"]["average"]["wer_sets"] == 1
    # evaluation decodes under the loop guards by default, and counts what they could not stop
    assert metrics["short_form"]["guards"]["temperature"] == [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
    assert {"hit_token_limit", "empty_outputs", "repeated_5grams"} <= set(
        metrics["short_form"]["sets"]["mine"]
    )
    assert (student / "best-ct2-int8" / "model.bin").is_file()
