"""The CPU demo end to end: tiny.en -> (whole encoder + 2 decoder layers) on the synthetic corpora.

    python benchmarks/distil_demo.py [hydra overrides for the train stage, e.g. trainer.max_steps=200]

Builds the synthetic corpora (distil.corpus), pseudo-labels their train splits with tiny.en as the default
pipeline recipe does (conf/recipe/demo.yaml: packed same-speaker segments, timestamps; distil.pseudo_label), trains `experiment=demo` (distil.train) and reports the test WER (normalised,
corpus-level, distil.evaluate.score) of the teacher, of the freshly initialised student and of the trained
student, plus the time each stage took. Everything lives under $DISTIL_HOME; every stage is idempotent, so a
second run reuses the corpus, the labels and the finished training run.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import distil.whisper.student  # noqa: F401  (resolver)
from distil.utils.paths import CONF_DIR


def _compose(name: str, overrides=()):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        return compose(name, overrides=list(overrides))


def test_wer(
    model_dir: str, corpora: str, names=("espeak", "flite", "festival"), batch_size: int = 16
) -> dict:
    from distil.evaluation.data import load_samples, set_entry
    from distil.evaluation.scoring import score
    from distil.whisper.generation import generation_kwargs, transcribe
    from distil.whisper.loading import load_model

    lm = load_model({"path": model_dir}, device="cpu", dtype="float32")
    out, refs_all, hyps_all = {}, [], []
    for name in names:
        entry = set_entry(name, {"path": f"{corpora}/{name}", "split": "test", "language": "en"})
        samples, _ = load_samples(entry)
        transcripts = transcribe(
            lm.model,
            lm.processor,
            [s.audio for s in samples],
            batch_size,
            generation_kwargs(lm.model, "en", None, 128),
        )
        hyps = [t.text for t in transcripts]
        refs = [s.reference for s in samples]
        out[name] = score(refs, hyps, "en")["wer"]
        refs_all += refs
        hyps_all += hyps
    out["all"] = score(refs_all, hyps_all, "en")["wer"]
    return out


def run(train_overrides=()) -> dict:
    from distil.data.synthetic_build import build_all
    from distil.pseudo_label import pseudo_label
    from distil.train import default_out_dir, override_dirname, train

    timings = {}
    t = time.time()
    corpus_cfg = _compose("corpus")
    build_all(corpus_cfg)
    timings["corpus_s"] = time.time() - t

    t = time.time()
    recipe = _compose("pipeline").recipe  # the pipeline's labelling settings, so both share one label store
    pl_cfg = _compose(
        "pseudo_label",
        [f"teacher={recipe.teacher}", "data=synthetic", "progress_bar=false", *recipe.pseudo_label],
    )
    pl = pseudo_label(pl_cfg, run_dir=Path(pl_cfg.paths.runs) / "pseudo_label" / "demo")
    timings["pseudo_label_s"] = time.time() - t

    cfg = _compose("train", ["experiment=demo", *train_overrides])
    OmegaConf.set_struct(cfg, False)
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg.out_dir = str(default_out_dir(cfg.students_root_dir, override_dirname(train_overrides)))
    t = time.time()
    summary = train(cfg)
    timings["train_s"] = time.time() - t

    corpora = cfg.paths.corpora
    result = {
        "pseudo_label_wer": {k: v.get("wer") for k, v in pl["splits"].items()},
        "test_wer": {
            "teacher": test_wer(summary["teacher_dir"], corpora),
            "initial_student": test_wer(summary["student_dir"], corpora),
            "trained_student_best": test_wer(summary["exports"]["best"], corpora),
            "trained_student_last": test_wer(summary["exports"]["last"], corpora),
        },
        "best_val_wer_weighted": summary["best_val_wer_weighted"],
        "global_step": summary["global_step"],
        "timings": timings,
        "out_dir": summary["out_dir"],
        "torch_threads": torch.get_num_threads(),
    }
    Path(summary["out_dir"], "demo_result.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    print(json.dumps(run(sys.argv[1:]), indent=2))
