"""The evaluation stage: metrics.json schema, predictions, bad inputs, checkpoints, speculative decoding."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from omegaconf import OmegaConf

from distil.config.schema import validate
from distil.data.audio import encode_flac
from distil.evaluate import evaluate
from distil.evaluation.data import EvalInputError
from distil.evaluation.latency import count_real_tokens
from distil.evaluation.scoring import averages, headlines, primary_metric
from distil.utils.errors import ConfigError
from distil.whisper.loading import ModelLoadError, load_model

SR = 16_000


def write_split(root: Path, name: str, rows: list[dict], split: str = "test") -> Path:
    out = root / name / split
    out.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), out / "part-00000.parquet")
    return root / name


def row(i: int, wave: np.ndarray, text: str | None) -> dict:
    return {
        "audio": {"bytes": encode_flac(wave, SR), "path": f"clip{i}.flac"},
        "text": text,
        "id": f"clip-{i}",
        "duration": len(wave) / SR,
    }


@pytest.fixture(scope="module")
def corpora(tmp_path_factory, tts_clips) -> Path:
    """Small eval sets in the corpus layout: references, no references, too-short audio, long-form."""
    root = tmp_path_factory.mktemp("corpora")
    write_split(root, "espeak", [row(i, c["audio"], c["text"]) for i, c in enumerate(tts_clips[:4])])
    write_split(root, "flite", [row(i, c["audio"], c["text"]) for i, c in enumerate(tts_clips[4:6])])
    write_split(root, "noref", [row(i, c["audio"], None) for i, c in enumerate(tts_clips[6:8])])
    write_split(root, "blip", [row(0, tts_clips[0]["audio"], "x"), row(1, np.zeros(80, np.float32), "y")])
    long_wave = np.concatenate([c["audio"] for c in tts_clips[:8]] + [np.zeros(SR, np.float32)] * 6)
    write_split(root, "longform", [row(0, long_wave, " ".join(c["text"] for c in tts_clips[:8]))])
    return root


SECTIONS = ("short_form", "long_form", "speculative", "latency", "noise")


def section(name: str, settings: dict | None) -> dict | None:
    """A section node as conf/eval/*.yaml writes it: its function (`_target_`) and its settings."""
    if settings is None:
        return None
    return {"_target_": f"distil.evaluation.sections.{name}", "_partial_": True, **settings}


def eval_cfg(model_path, corpora: Path, **sections) -> OmegaConf:
    base = {
        "model": {"path": str(model_path), "name": "under-test"},
        "device": "cpu",
        "dtype": "auto",
        "eval": {
            "batch_size": 2,
            "max_new_tokens": 8,
            "num_beams": 1,
            "seed": 0,
            "sets": {
                "espeak": {"path": str(corpora / "espeak"), "split": "test"},
                "flite": {"path": str(corpora / "flite"), "split": "test"},
            },
            "short_form": section("short_form", {}),
            "long_form": None,
            "speculative": None,
            "latency": None,
            "noise": None,
        },
    }
    base["eval"].update({k: section(k, v) if k in SECTIONS else v for k, v in sections.items()})
    return OmegaConf.create(base)


def long_form_cfg(
    corpora: Path, chunk_length_s: float, max_new_tokens: int, temperature: list[float]
) -> dict:
    """The long-form section on the one `longform` recording, both algorithms (a temperature of [0.0] turns
    fallback off: fallback itself is tested on tiny.en in test_longform.py)."""
    return {
        "sets": {"longform": {"path": str(corpora / "longform"), "split": "test"}},
        "algorithms": ["chunked", "sequential"],
        "chunk_length_s": chunk_length_s,
        "stride_length_s": None,
        "batch_size": 4,
        "max_new_tokens": max_new_tokens,
        "sequential": {
            "batch_size": 1,
            "temperature": temperature,
            "compression_ratio_threshold": 1.35,
            "logprob_threshold": -1.0,
            "no_speech_threshold": 0.6,
            "condition_on_prev_tokens": False,
        },
    }


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_full_evaluation_writes_metrics_predictions_and_tensorboard(tiny_random_dir, corpora, tmp_path):
    cfg = eval_cfg(
        tiny_random_dir,
        corpora,
        long_form=long_form_cfg(corpora, chunk_length_s=10, max_new_tokens=8, temperature=[0.0]),
        latency={"set": "flite", "batch_sizes": [1, 2], "samples": 2, "warmup": 1},
        noise={"set": "flite", "types": ["white", "pink"], "snr_db": [0], "samples": 2, "seed": 0},
    )
    metrics = evaluate(cfg, tmp_path)
    on_disk = json.loads((tmp_path / "metrics.json").read_text())
    assert on_disk["short_form"]["average"] == pytest.approx(metrics["short_form"]["average"])

    assert metrics["model"]["name"] == "under-test" and metrics["model"]["parameters"] > 0
    assert metrics["device"]["device"] == "cpu" and metrics["device"]["threads"] >= 1
    sets = metrics["short_form"]["sets"]
    for name, n in (("espeak", 4), ("flite", 2)):
        entry = sets[name]
        assert entry["status"] == "ok" and entry["samples"] == n
        assert entry["wer"] is not None and entry["wer_orthographic"] is not None
        rows = read_jsonl(tmp_path / entry["predictions"])
        assert [r["id"] for r in rows] == [f"clip-{i}" for i in range(n)]  # input order, not duration order
        assert set(rows[0]) == {"id", "reference", "prediction", "wer", "tokens", "hit_limit"}
    avg = metrics["short_form"]["average"]
    assert {
        "wer_macro",
        "wer_sample_weighted",
        "wer_orthographic_macro",
        "wer_orthographic_sample_weighted",
    } <= set(avg)

    long_entry = metrics["long_form"]["sets"]["longform"]
    assert long_entry["status"] == "ok" and long_entry["audio_seconds"] > 30
    for algo in ("chunked", "sequential"):
        result = long_entry[algo]
        for key in ("wer", "insertion_rate", "deletion_rate", "substitution_rate", "repeated_5grams"):
            assert key in result, (algo, key)
        assert (tmp_path / result["predictions"]).exists()
    assert long_entry["chunked"]["settings"]["stride_length_s"] == pytest.approx(10 / 6)

    lat = metrics["latency"]
    assert set(lat["batch_sizes"]) == {"1", "2"}
    for entry in lat["batch_sizes"].values():
        assert entry["rtfx"] > 0 and entry["tokens"] > 0 and entry["tokens_per_second"] > 0
    assert lat["warmup_runs"] == 1 and "threads" in lat

    noise = metrics["noise"]
    assert set(noise["white"]) == {"0"} and set(noise["pink"]) == {"0"}
    assert noise["clean"] is not None

    events = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert events, "no TensorBoard event file"
    # the sweep objective is the first error rate among the sections' headlines: the short-form WER
    assert primary_metric(metrics) == avg["wer_sample_weighted"]
    assert metrics["short_form"]["headline"]["short_form_wer"]["value"] == avg["wer_sample_weighted"]
    assert set(headlines(metrics)) == {
        "short_form_wer",
        "short_form_hit_limit",
        "short_form_repeated_5grams",
        "long_form_wer_chunked",
        "long_form_wer_sequential",
        "rtfx",
        "noise_wer",
    }


def test_bad_sets_are_reported_and_the_others_still_evaluated(tiny_random_dir, corpora, tmp_path):
    cfg = eval_cfg(tiny_random_dir, corpora, speculative={"assistant": None, "set": "flite"})
    cfg.eval.max_samples = 2
    cfg.eval.sets.pop("espeak")
    cfg.eval.sets.noref = {"path": str(corpora / "noref"), "split": "test"}
    cfg.eval.sets.nocolumn = {"path": str(corpora / "noref"), "split": "test", "text_column": None}
    cfg.eval.sets.blip = {"path": str(corpora / "blip"), "split": "test"}
    cfg.eval.sets.missing = {"path": str(corpora / "does_not_exist"), "split": "test"}
    cfg.eval.sets.badcol = {"path": str(corpora / "espeak"), "split": "test", "text_column": "transcript"}
    with pytest.raises(EvalInputError, match=r"3 eval set\(s\) failed: short_form.blip, short_form.missing"):
        evaluate(cfg, tmp_path)  # the other sets are evaluated and written, and the command fails
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    sets = metrics["short_form"]["sets"]
    assert sets["flite"]["status"] == "ok"
    assert metrics["speculative"]["status"] == "skipped"  # no assistant configured
    for name in ("noref", "nocolumn"):
        assert sets[name]["status"] == "no references"
        rows = read_jsonl(tmp_path / sets[name]["predictions"])
        assert len(rows) == 2 and all(r["reference"] is None and r["wer"] is None for r in rows)
        assert all(isinstance(r["prediction"], str) for r in rows)
    assert sets["blip"]["status"] == "error" and "shorter than one 10 ms frame" in sets["blip"]["error"]
    assert sets["missing"]["status"] == "error" and "does_not_exist" in sets["missing"]["error"]
    assert sets["badcol"]["status"] == "error" and "transcript" in sets["badcol"]["error"]
    assert metrics["short_form"]["average"]["wer_sets"] == 1  # only the scorable sets are averaged

    # With skip_bad_audio the short clip is skipped and listed, the rest is scored.
    cfg.eval.skip_bad_audio = True
    cfg.eval.sets = {"blip": {"path": str(corpora / "blip"), "split": "test"}}
    blip = evaluate(cfg, tmp_path / "skip")["short_form"]["sets"]["blip"]
    assert blip["status"] == "ok" and blip["samples"] == 1
    assert [p["id"] for p in blip["skipped_bad_audio"]] == ["clip-1"]


def test_model_directory_without_processor_is_a_clear_error(tiny_random_dir, tmp_path):
    from transformers import WhisperForConditionalGeneration

    bare = tmp_path / "bare"
    WhisperForConditionalGeneration.from_pretrained(tiny_random_dir).save_pretrained(bare)
    with pytest.raises(ModelLoadError, match="feature extractor|tokenizer|processor"):
        load_model({"path": str(bare)}, device="cpu")


def test_training_checkpoint_loads_and_other_architectures_are_rejected(tiny_random_dir, tmp_path):
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    reference = load_model({"path": str(tiny_random_dir)}, device="cpu")
    state = {f"student.{k}": v.clone() for k, v in reference.model.state_dict().items()}
    state["teacher.some.weight"] = torch.zeros(1)  # the frozen teacher is not the model to evaluate
    ckpt = tmp_path / "last.ckpt"
    torch.save({"state_dict": state, "epoch": 1}, ckpt)
    loaded = load_model({"path": str(ckpt), "base": str(tiny_random_dir)}, device="cpu")
    assert loaded.kind == "checkpoint"
    for key, value in reference.model.state_dict().items():
        assert torch.equal(value, loaded.model.state_dict()[key]), key

    with pytest.raises(ModelLoadError, match=r"model\.base"):
        load_model({"path": str(ckpt)}, device="cpu")

    other = WhisperForConditionalGeneration(
        WhisperConfig.from_pretrained(tiny_random_dir, decoder_layers=1, d_model=32, encoder_ffn_dim=64)
    )
    torch.save(
        {"state_dict": {f"student.{k}": v for k, v in other.state_dict().items()}}, tmp_path / "other.ckpt"
    )
    with pytest.raises(ModelLoadError, match="does not fit the architecture"):
        load_model({"path": str(tmp_path / "other.ckpt"), "base": str(tiny_random_dir)}, device="cpu")

    torch.save({"state_dict": {"model.layer.weight": torch.zeros(2)}}, tmp_path / "foreign.ckpt")
    with pytest.raises(ModelLoadError, match="not a distil"):
        load_model({"path": str(tmp_path / "foreign.ckpt"), "base": str(tiny_random_dir)}, device="cpu")


@pytest.mark.parametrize(
    "teacher_fixture, decoder_layers, eval_set",
    [
        # Fast: the random teacher verifies its 1-decoder-layer student's drafts.
        ("tiny_random_dir", 1, "flite"),
        # tiny.en verified by a 2-decoder-layer student made from it (~1 min on 2 shared cores).
        pytest.param("tiny_en_dir", 2, "espeak", marks=pytest.mark.slow),
    ],
)
def test_speculative_decoding_reproduces_the_teacher(
    request, teacher_fixture, decoder_layers, eval_set, corpora, tmp_path
):
    """The student as a decoder-only assistant on the teacher's encoder output: outputs identical to greedy."""
    from distil.whisper.student import init_student

    teacher_dir = request.getfixturevalue(teacher_fixture)
    student = init_student(teacher_dir, tmp_path / "student", decoder_layers=decoder_layers)
    cfg = eval_cfg(
        teacher_dir,
        corpora,
        speculative={"assistant": str(student), "set": eval_set, "samples": 2, "warmup": 1},
    )
    cfg.eval.sets = {eval_set: cfg.eval.sets[eval_set]}
    cfg.eval.max_samples = 2
    metrics = evaluate(cfg, tmp_path / "run")
    spec = metrics["speculative"]
    assert spec["status"] == "ok", spec
    assert spec["shares_encoder"] is True and spec["assistant"]["decoder_layers"] == decoder_layers
    assert spec["identical_fraction"] == 1.0 and spec["mismatched_samples"] == []
    assert spec["teacher_seconds"] > 0 and spec["speculative_seconds"] > 0 and spec["batch_size"] == 1
    rows = read_jsonl(tmp_path / "run" / spec["predictions"])
    assert all(r["teacher"] == r["speculative"] for r in rows)
    # ... and equal to the teacher's batched short-form transcripts of the same clips
    short = read_jsonl(tmp_path / "run" / metrics["short_form"]["sets"][eval_set]["predictions"])
    assert [r["teacher"].strip() for r in rows] == [r["prediction"] for r in short]


def test_count_real_tokens_skips_prompt_padding_and_after_eos():
    eos, sot, notimestamps = 50256, 50257, 50362
    seqs = torch.tensor(
        [
            [sot, notimestamps, 10, 11, 12, eos, eos, eos],  # 3 text + eos
            [sot, notimestamps, 20, eos, 7, 7, 7, 7],  # junk after eos is not counted
            [30, 31, 32, 33, 34, 35, 36, 37],  # no prompt (transformers strips it), no eos (hit max)
        ]
    )
    assert count_real_tokens(seqs, eos, {sot, notimestamps}) == 4 + 2 + 8


def test_macro_and_sample_weighted_averages_differ_as_labelled():
    sets = {
        "big": {"status": "ok", "wer": 10.0, "wer_orthographic": 20.0, "scored": 90},
        "small": {"status": "ok", "wer": 50.0, "wer_orthographic": 60.0, "scored": 10},
        "broken": {"status": "error", "error": "x"},
    }
    avg = averages(sets)
    assert avg["wer_macro"] == pytest.approx(30.0)
    assert avg["wer_sample_weighted"] == pytest.approx(14.0)
    assert avg["wer_sets"] == 2


def test_ctranslate2_backend_matches_pytorch_at_float32_in_every_section_but_speculative(
    tiny_random_dir, corpora, tmp_path
):
    from distil.whisper.ct2_export import ExportInputError

    latency = {"set": "flite", "batch_sizes": [1, 2], "samples": 2, "warmup": 1}
    noise = {"set": "flite", "types": ["white"], "snr_db": [0], "samples": 2, "seed": 0}
    speculative = {"assistant": str(tiny_random_dir), "set": "flite", "samples": 1}
    cfg = eval_cfg(tiny_random_dir, corpora, latency=latency, noise=noise, speculative=speculative)
    torch_metrics = evaluate(cfg, tmp_path / "pytorch")
    cfg.backend, cfg.compute_type = "ctranslate2", "float32"
    metrics = evaluate(cfg, tmp_path / "ct2")

    assert metrics["backend"] == "ctranslate2" and torch_metrics["backend"] == "pytorch"
    assert metrics["model"]["kind"] == "ctranslate2" and metrics["model"]["dtype"] == "float32"
    assert (tmp_path / "ct2" / "ctranslate2-float32" / "model.bin").is_file()
    for name in ("espeak", "flite"):  # same features, same greedy decoding: the same transcripts
        ours = read_jsonl(tmp_path / "ct2" / metrics["short_form"]["sets"][name]["predictions"])
        theirs = read_jsonl(tmp_path / "pytorch" / torch_metrics["short_form"]["sets"][name]["predictions"])
        assert ours == theirs and all(r["prediction"] for r in ours)
    assert metrics["short_form"]["average"] == torch_metrics["short_form"]["average"]
    for b, entry in metrics["latency"]["batch_sizes"].items():  # same schema, same token count
        assert set(entry) == set(torch_metrics["latency"]["batch_sizes"][b])
        assert entry["rtfx"] > 0 and entry["tokens"] == torch_metrics["latency"]["batch_sizes"][b]["tokens"]
    # noise runs through the backend's own transcribe: the same noisy audio, the same transcripts
    assert metrics["noise"]["white"] == torch_metrics["noise"]["white"] and "noise_wer" in headlines(metrics)
    assert torch_metrics["speculative"]["status"] == "ok"
    assert metrics["speculative"] == {
        "status": "skipped",
        "reason": "the ctranslate2 backend has no assisted generation",
    }

    # under the loop guards, CTranslate2 decodes clip by clip through faster-whisper's own fallback
    guarded = cfg.copy()
    guarded.eval.update(latency=None, noise=None, speculative=None, guards={"max_tokens_per_second": 2})
    guarded_metrics = evaluate(guarded, tmp_path / "ct2-guards")
    assert guarded_metrics["short_form"]["guards"]["max_tokens_per_second"] == 2
    for name in ("espeak", "flite"):
        entry = guarded_metrics["short_form"]["sets"][name]
        rows = read_jsonl(tmp_path / "ct2-guards" / entry["predictions"])
        # a random model rambles: 2 tokens per second of audio cut every clip at its limit, and the count says so
        assert entry["status"] == "ok" and entry["hit_token_limit"] == sum(r["hit_limit"] for r in rows) > 0

    cfg.compute_type = "int3"
    with pytest.raises(ExportInputError, match="int3"):
        evaluate(cfg, tmp_path / "bad")
    cfg.backend = "onnx"
    with pytest.raises(
        ConfigError, match=r"^backend must be one of \['pytorch', 'ctranslate2'\], got 'onnx'$"
    ):
        validate(cfg, "evaluate")  # distil-evaluate's first step (distil.config.schema)


def test_ctranslate2_backend_runs_long_form_through_faster_whisper(tiny_en_dir, corpora, tmp_path):
    """Deployed long-form: faster-whisper's own sequential (no VAD) and batched (VAD-cut) algorithms on a
    45-s recording, next to the PyTorch backend's chunked and sequential on the same recording."""
    long_form = long_form_cfg(corpora, chunk_length_s=30, max_new_tokens=444, temperature=[0.0, 0.4, 0.8])
    cfg = eval_cfg(tiny_en_dir, corpora, sets=None, long_form=long_form)
    cfg.backend, cfg.compute_type = "ctranslate2", "int8"
    metrics = evaluate(cfg, tmp_path / "ct2")
    cfg.backend = "pytorch"
    torch_metrics = evaluate(cfg, tmp_path / "pytorch")

    ours, theirs = metrics["long_form"]["sets"]["longform"], torch_metrics["long_form"]["sets"]["longform"]
    assert ours["status"] == "ok" and ours["audio_seconds"] > 30
    assert ours["sequential"]["settings"]["vad_filter"] is False
    assert ours["chunked"]["settings"]["segmentation"] == "silero-vad"
    for algo in ("chunked", "sequential"):
        (row,) = read_jsonl(tmp_path / "ct2" / ours[algo]["predictions"])
        assert len(row["prediction"].split()) > 40  # the whole recording, not its first window
        assert ours[algo]["settings"]["runtime"] == "faster-whisper"
        # tiny.en on clean TTS: deployed int8 close to PyTorch float32, and neither loops.
        assert ours[algo]["wer"] < 25 and ours[algo]["wer"] < theirs[algo]["wer"] + 10
        assert ours[algo]["repeated_5grams"] == 0


def test_a_capped_set_is_spread_over_the_split(tmp_path):
    """Corpora are ordered by speaker: `max_samples` takes evenly spaced rows, so every speaker is heard."""
    from distil.data.entries import spread_subset
    from distil.evaluation.data import load_samples, set_entry

    assert spread_subset(10, 3) == [0, 3, 6] and spread_subset(4, None) == spread_subset(4, 9) == [0, 1, 2, 3]
    assert spread_subset(60, 24)[-1] >= 45  # the last speaker's quarter of a 4-speaker test split is reached
    (tmp_path / "test").mkdir()
    wave = 0.1 * np.sin(np.linspace(0, 400, 8000)).astype(np.float32)
    rows = [
        {
            "audio": {"bytes": encode_flac(wave, 16000), "path": None},
            "text": f"row {i}",
            "id": f"spk{i // 5}-{i}",
        }
        for i in range(10)
    ]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "test" / "part-0.parquet")
    samples, _ = load_samples(set_entry("grouped", {"path": str(tmp_path), "split": "test"}), max_samples=4)
    assert [s.id for s in samples] == ["spk0-0", "spk0-2", "spk1-5", "spk1-7"]
    assert [s.reference for s in samples] == ["row 0", "row 2", "row 5", "row 7"]


def test_an_unknown_key_of_an_eval_set_is_refused_by_name_before_the_model_loads(tmp_path, monkeypatch):
    import distil.evaluate as evaluate_module

    def no_model(*args, **kwargs):
        raise AssertionError("the model loaded before the eval sets were checked")

    monkeypatch.setattr(evaluate_module, "load_model", no_model)
    cfg = OmegaConf.create(
        {
            "model": {"name": "m", "path": str(tmp_path)},
            "eval": {"sets": {"mine": {"path": str(tmp_path), "split": "test", "max_sample": 3}}},
        }
    )
    with pytest.raises(EvalInputError, match=r"eval.sets.mine has unknown key\(s\) \['max_sample'\]"):
        evaluate(cfg, tmp_path / "out")
    cfg.eval.sets.mine.pop("max_sample")
    cfg.eval.long_form = {"sets": {"talks": {"path": str(tmp_path), "chunk": 5}}}
    with pytest.raises(EvalInputError, match=r"eval.long_form.sets.talks has unknown key\(s\) \['chunk'\]"):
        evaluate(cfg, tmp_path / "out")
    cfg.eval.long_form = None
    cfg.eval.guards = {"temperature": [], "compression_ratio_threshold": 1.35}
    with pytest.raises(ConfigError, match=r"eval.guards.temperature=\[\]"):
        evaluate(cfg, tmp_path / "out")


def test_contributing_example_section_runs(tiny_random_dir, corpora, tmp_path, monkeypatch):
    """CONTRIBUTING.md's worked example of an evaluation section, run as written: a section added as one
    function and one config node reaches metrics.json and the headlines with nothing else edited."""
    import re
    import sys
    import types

    import distil.evaluation.sections as sections

    text = (Path(__file__).parents[1] / "CONTRIBUTING.md").read_text()
    code = re.search(r"```python\n(.*?def by_length.*?)```", text, re.S).group(1)
    module = types.ModuleType("contributing_example")
    module.__dict__.update(vars(sections))
    exec(compile(textwrap.dedent(code), "CONTRIBUTING.md", "exec"), module.__dict__)
    monkeypatch.setitem(sys.modules, "contributing_example", module)

    cfg = eval_cfg(tiny_random_dir, corpora)
    cfg.eval.by_length = {
        "_target_": "contributing_example.by_length",
        "_partial_": True,
        "set": "espeak",
        "bins_s": [0, 2, 5, 10, 30],
    }
    metrics = evaluate(cfg, tmp_path)
    result = metrics["by_length"]
    assert result["status"] == "ok" and result["set"] == "espeak" and result["bins"]
    assert all(re.fullmatch(r"\d+-\d+s", b) for b in result["bins"])
    assert headlines(metrics)["short_clip_wer"]["value"] == next(iter(result["bins"].values()))
