"""Stage 1, pseudo-labelling: labels, resume, job shards, streaming, packing, bad input, config errors.

Runs the real stage (Hydra-composed config, Lightning `Trainer.predict`) on a small parquet dataset of TTS
clips with the tiny random teacher; one check uses the real tiny.en teacher.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from helpers import SimulatedKill, atomic_writes, dead_pid, write_kind
from hydra import compose, initialize_config_dir
from lightning.pytorch.callbacks import Callback
from transformers import AutoTokenizer, WhisperFeatureExtractor, WhisperForConditionalGeneration

from distil.config.schema import validate
from distil.data.audio import encode_flac
from distil.data.entries import DataConfigError, DatasetEntry, load_split
from distil.data.label_plan import Clip, LabellingSpec, pack_units, split_shard_size
from distil.data.label_store import SUCCESS, LabellingStateError, ShardWriter, build_prompt
from distil.data.text import corpus_wer, english_normalizer, sample_wer
from distil.datamodules.labelling import LabellingSource, ShardBatches
from distil.modules.transcriber import GenerationConfigError
from distil.pseudo_label import pseudo_label
from distil.utils.errors import ConfigError
from distil.utils.parallel import resolve_parallelism
from distil.utils.paths import CONF_DIR

# Speaker of each TTS clip (a label for packing, independent of the voice that spoke it).
SPEAKERS = ["A"] * 5 + ["B"] * 3 + ["A"] * 4
BAD_INDEX, LONG_INDEX = 5, 10  # positions of the corrupt and the 31 s clip in the dataset


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, tts_clips) -> Path:
    """12 TTS clips + one undecodable clip + one 31 s clip, as `<dir>/train/*.parquet` (two files)."""
    rows = [
        {
            "audio": {"bytes": encode_flac(c["audio"], 16000), "path": None},
            "text": c["text"],
            "id": f"clip-{i:02d}",
            "speaker": SPEAKERS[i],
            "duration": len(c["audio"]) / 16000,
        }
        for i, c in enumerate(tts_clips)
    ]
    rows.insert(
        BAD_INDEX,
        {
            "audio": {"bytes": b"RIFF garbage", "path": None},
            "text": "broken",
            "id": "bad",
            "speaker": "B",
            "duration": 1.0,
        },
    )
    long_wave = np.tile(tts_clips[0]["audio"], int(np.ceil(31 * 16000 / len(tts_clips[0]["audio"]))))[
        : 31 * 16000
    ]
    rows.insert(
        LONG_INDEX,
        {
            "audio": {"bytes": encode_flac(long_wave, 16000), "path": None},
            "text": "long",
            "id": "long",
            "speaker": "A",
            "duration": 31.0,
        },
    )
    root = tmp_path_factory.mktemp("corpus")
    (root / "train").mkdir()
    ds = datasets.Dataset.from_list(rows).cast_column("audio", datasets.Audio(decode=False))
    ds.select(range(7)).to_parquet(str(root / "train" / "a.parquet"))
    ds.select(range(7, len(ds))).to_parquet(str(root / "train" / "b.parquet"))
    return root


def make_cfg(home: Path, teacher_dir: Path, data_path: Path, *overrides: str):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        return compose(
            "pseudo_label",
            overrides=[
                f"paths.root={home}",
                "teacher=tiny_random",
                f"teacher.path={teacher_dir}",
                "data=custom",
                f"data.datasets.0.path={data_path}",
                "data.datasets.0.id_column=id",
                "data.datasets.0.speaker_column=speaker",
                "data.datasets.0.duration_column=duration",
                "batch_size=4",
                "shard_size=4",
                "progress_bar=false",
                "trainer.devices=1",  # one in-process run (the callbacks below run where they are created)
                *overrides,
            ],
        )


def run(home, teacher_dir, data_path, *overrides, callbacks=()):
    cfg = make_cfg(home, teacher_dir, data_path, *overrides)
    return cfg, pseudo_label(cfg, run_dir=home / "run", callbacks=callbacks)


def read_rows(out_dir: Path) -> list[dict]:
    rows = []
    for f in sorted(Path(out_dir).glob("part-*.parquet")):
        rows += pq.read_table(f).to_pylist()
    return rows


def split_out(summary) -> Path:
    return Path(summary["splits"]["custom/train"]["out_dir"])


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_random_dir, corpus):
    """One uninterrupted map-style run: the output other runs must reproduce."""
    home = tmp_path_factory.mktemp("reference")
    cfg, summary = run(home, tiny_random_dir, corpus)
    return cfg, summary, split_out(summary)


def test_labels_match_direct_generation_and_wer(reference, tiny_random_dir, tts_clips, capsys):
    cfg, summary, out = reference
    rows = read_rows(out)
    assert (out / SUCCESS).exists()
    assert [r["id"] for r in rows] == [
        f"clip-{i:02d}" for i in range(12)
    ]  # dataset order, bad + long skipped
    assert set(rows[0]) >= {
        "audio",
        "text",
        "id",
        "speaker",
        "duration",
        "whisper_transcript",
        "token_ids",
        "pseudo_label",
        "pl_wer",
        "pl_index",
    }

    # Independent computation: the model's own generate() per clip.
    model = WhisperForConditionalGeneration.from_pretrained(tiny_random_dir).eval()
    fe = WhisperFeatureExtractor.from_pretrained(tiny_random_dir)
    tok = AutoTokenizer.from_pretrained(tiny_random_dir)
    eos = model.generation_config.eos_token_id
    refs, hyps = [], []
    for i, row in enumerate(rows):
        feats = fe(tts_clips[i]["audio"], sampling_rate=16000, return_tensors="pt").input_features
        with torch.inference_mode():
            gen = model.generate(feats, max_new_tokens=cfg.generation.max_new_tokens)[0].tolist()
        gen = gen[: gen.index(eos)] if eos in gen else gen
        text = tok.decode(gen, skip_special_tokens=True).strip()
        prefix = [
            model.generation_config.decoder_start_token_id,
            model.generation_config.no_timestamps_token_id,
        ]
        assert row["token_ids"] == prefix + gen + [eos]
        assert row["whisper_transcript"] == tok.decode(row["token_ids"], skip_special_tokens=False)
        assert row["whisper_transcript"].startswith("<|startoftranscript|><|notimestamps|>")
        assert row["whisper_transcript"].endswith("<|endoftext|>")
        assert row["pseudo_label"] == text
        assert row["pl_wer"] == pytest.approx(sample_wer(tts_clips[i]["text"], text, english_normalizer()))
        refs.append(tts_clips[i]["text"])
        hyps.append(text)
    split = summary["splits"]["custom/train"]
    assert split["wer"] == pytest.approx(corpus_wer(refs, hyps, english_normalizer()).wer)
    assert split["samples"] == 12 and split["skipped"] == 2
    assert split["audio_hours"] == pytest.approx(
        sum(len(c["audio"]) for c in tts_clips) / 16000 / 3600, rel=1e-6
    )

    # Provenance: teacher name + fingerprint + generation config, in the json and in the parquet metadata.
    labels = json.loads((out / "distil_labels.json").read_text())
    assert labels["teacher"]["name"] == "whisper-tiny-random"
    assert labels["teacher"]["fingerprint"].startswith("sha256:")
    assert labels["generation"]["num_beams"] == 1
    meta = json.loads(pq.read_schema(next(out.glob("part-*.parquet"))).metadata[b"distil"])
    assert meta["teacher"] == labels["teacher"]
    assert json.loads((out / "summary.json").read_text())["samples"] == 12
    assert json.loads((Path(cfg.paths.root) / "run" / "summary.json").read_text())["splits"]["custom/train"][
        "wer"
    ]
    assert list((Path(cfg.paths.root) / "run" / "tensorboard").glob("events.out.tfevents.*"))

    # The output is a plain HF dataset with the Audio feature kept.
    loaded = datasets.load_dataset(
        "parquet",
        data_files=str(out / "*.parquet"),
        split="train",
        cache_dir=str(Path(cfg.paths.root) / "hf"),
    )
    assert isinstance(loaded.features["audio"], datasets.Audio) and len(loaded) == 12
    # ... and later stages read it with the shared loader (sidecar json files are not data).
    again = load_split(
        DatasetEntry(name="labels", path=str(out.parent)), "train", cache_dir=str(Path(cfg.paths.root) / "hf")
    )
    assert len(again) == 12 and again[0]["whisper_transcript"] == rows[0]["whisper_transcript"]


def test_bad_and_too_long_audio_are_skipped_and_listed(reference):
    _, summary, out = reference
    skipped = [json.loads(line) for line in (out / "skipped.jsonl").read_text().splitlines()]
    assert [(s["ids"], s["reason"]) for s in skipped] == [
        (["bad"], "unreadable_audio"),
        (["long"], "too_long"),
    ]
    assert "31.00 s > 30 s" in skipped[1]["detail"]
    assert summary["splits"]["custom/train"]["skipped_by_reason"] == {"unreadable_audio": 1, "too_long": 1}


class KillAfterShards(Callback):
    """Simulates a kill: raise once the writer has completed `n` shards."""

    def __init__(self, n: int):
        self.n = n

    def on_predict_batch_end(self, trainer, *args, **kwargs):
        writer = next(c for c in trainer.callbacks if isinstance(c, ShardWriter))
        if writer.shards_written >= self.n:
            raise RuntimeError("simulated kill")


def test_killed_run_resumes_to_identical_output(tmp_path, tiny_random_dir, corpus, reference):
    with pytest.raises(RuntimeError, match="simulated kill"):
        run(tmp_path, tiny_random_dir, corpus, callbacks=[KillAfterShards(2)])
    out = tmp_path / "pseudo_labels" / "whisper-tiny-random" / "custom" / "train"
    assert not (out / SUCCESS).exists() and len(list((out / "_progress").glob("part-*.json"))) == 2
    # Also lose a finished shard's manifest (a kill between its parquet and manifest): it is redone.
    (out / "_progress" / "part-00000.json").unlink()
    _, summary = run(tmp_path, tiny_random_dir, corpus)
    split = summary["splits"]["custom/train"]
    assert split["this_run"]["samples"] == 14 - 4  # only the 3 missing shards (of 4 units each, last has 2)
    assert read_rows(out) == read_rows(reference[2])
    assert (out / "skipped.jsonl").read_text() == (reference[2] / "skipped.jsonl").read_text()
    # A third run finds everything done and does nothing.
    _, again = run(tmp_path, tiny_random_dir, corpus)
    assert again["splits"]["custom/train"]["this_run"] is None


def test_resume_with_other_settings_is_refused(tmp_path, tiny_random_dir, corpus):
    with pytest.raises(RuntimeError, match="simulated kill"):
        run(tmp_path, tiny_random_dir, corpus, callbacks=[KillAfterShards(1)])
    with pytest.raises(LabellingStateError, match="different settings.*generation"):
        run(tmp_path, tiny_random_dir, corpus, "generation.num_beams=2")


def test_packing_plan_names_only_the_options_that_are_set(tmp_path, tiny_random_dir, corpus):
    """A packing option left at null is not part of the plan (labels made before it existed still resume);
    setting it is a change of settings, refused on resume like any other."""
    with pytest.raises(RuntimeError, match="simulated kill"):
        run(tmp_path, tiny_random_dir, corpus, "packing.enabled=true", callbacks=[KillAfterShards(1)])
    out = Path(make_cfg(tmp_path, tiny_random_dir, corpus).out_dir) / "custom" / "train"
    plan = json.loads((out / "_progress" / "plan.json").read_text())
    assert plan["packing"] == {"enabled": True, "max_seconds": 30}
    with pytest.raises(LabellingStateError, match="different settings.*packing"):
        run(tmp_path, tiny_random_dir, corpus, "packing.enabled=true", "packing.min_seconds=0")


def test_resume_on_changed_input_is_refused(tmp_path, tiny_random_dir, corpus):
    """The same rows in another order under the same path: resuming would label some clips twice and
    others never, so the resume is refused, naming the input."""
    data = tmp_path / "data"
    shutil.copytree(corpus, data)
    with pytest.raises(RuntimeError, match="simulated kill"):
        run(tmp_path, tiny_random_dir, data, callbacks=[KillAfterShards(2)])
    files = sorted((data / "train").glob("*.parquet"))
    rows = datasets.concatenate_datasets([datasets.Dataset.from_parquet(str(f)) for f in files])
    for f in files:
        f.unlink()
    rows.shuffle(seed=1).to_parquet(str(data / "train" / "a.parquet"))  # same rows, another order
    with pytest.raises(LabellingStateError, match=rf"input of .* changed.*{data}.*another order"):
        run(tmp_path, tiny_random_dir, data)


def test_labelling_progress_is_in_the_log(tmp_path, tiny_random_dir, corpus, caplog):
    caplog.set_level("INFO", logger="distil.progress")
    run(tmp_path, tiny_random_dir, corpus, "progress_log_every_s=0")  # a line per batch
    lines = [r.getMessage() for r in caplog.records if r.name == "distil.progress"]
    assert lines and all(line.startswith("labelling custom/train: ") for line in lines)
    assert (
        lines[0].startswith("labelling custom/train: 1/") and "s each" in lines[0] and "min left" in lines[0]
    )
    done, total = lines[-1].split(": ")[1].split(" ")[0].split("/")
    assert done == total and len(lines) == int(total)  # the last batch, and every one in between


def test_a_run_killed_while_finalising_does_not_block_completion(tmp_path, tiny_random_dir, corpus, caplog):
    import os
    import socket

    _, summary = run(tmp_path, tiny_random_dir, corpus)
    out = Path(summary["splits"]["custom/train"]["out_dir"])
    (out / SUCCESS).unlink()  # killed during finalise: every shard is there, the lock is left behind
    lock = out / "_progress" / "finalise.lock"
    gone_pid = dead_pid()
    lock.write_text(json.dumps({"pid": gone_pid, "host": socket.gethostname(), "started": 0}))
    _, again = run(tmp_path, tiny_random_dir, corpus)
    assert again["splits"]["custom/train"]["status"] == "complete" and (out / SUCCESS).exists()
    assert not lock.exists()
    # A live process finalising: the run says so (who, how long, which lock) instead of "shards missing".
    (out / SUCCESS).unlink()
    lock.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": 0}))
    _, busy = run(tmp_path, tiny_random_dir, corpus)
    assert busy["splits"]["custom/train"]["status"] == "incomplete"
    assert f"(pid {os.getpid()} on {socket.gethostname()}) has been finalising" in caplog.text
    assert str(lock) in caplog.text


def test_concurrent_runs_split_the_pending_shards(tmp_path, tiny_random_dir, corpus, caplog):
    """Shards another live run has claimed are left to it; claims of a run that is gone are taken over."""
    import os
    import socket

    out = tmp_path / "pseudo_labels" / "whisper-tiny-random" / "custom" / "train"
    (out / "_progress").mkdir(parents=True)
    other = json.dumps({"pid": os.getppid(), "host": socket.gethostname(), "started": 0})  # a live process
    for k in (1, 3):
        (out / "_progress" / f"part-{k:05d}.claim").write_text(other)
    _, first = run(tmp_path, tiny_random_dir, corpus)
    split = first["splits"]["custom/train"]
    assert split["status"] == "incomplete" and split["missing_shards"] == [1, 3]
    assert split["this_run"]["shards_written"] == 2  # shards 0 and 2 only: nothing labelled twice
    assert "shards [1, 3] are being labelled by another live run" in caplog.text
    gone_pid = dead_pid()
    for k in (1, 3):  # that run was killed: its claims no longer hold
        (out / "_progress" / f"part-{k:05d}.claim").write_text(
            json.dumps({"pid": gone_pid, "host": socket.gethostname()})
        )
    _, second = run(tmp_path, tiny_random_dir, corpus)
    assert second["splits"]["custom/train"]["status"] == "complete"
    assert second["splits"]["custom/train"]["this_run"]["shards_written"] == 2
    assert not list((out / "_progress").glob("*.claim"))


def test_a_split_with_duplicate_ids_is_never_marked_complete(tmp_path):
    from distil.data.label_jobs import check_unique_ids

    for k, ids in enumerate((["a", "b"], ["c", "a"])):
        pq.write_table(pa.table({"id": ids}), tmp_path / f"part-{k:05d}.parquet")
    entry = DatasetEntry(name="x", path=str(tmp_path))
    with pytest.raises(LabellingStateError, match=r"1 ids are labelled twice \(e.g. \['a'\]\)"):
        check_unique_ids(tmp_path, entry)
    pq.write_table(pa.table({"id": ["c", "d"]}), tmp_path / "part-00001.parquet")
    check_unique_ids(tmp_path, entry)


def test_two_jobs_merge_to_the_full_run(tmp_path, tiny_random_dir, corpus, reference):
    _, first = run(tmp_path, tiny_random_dir, corpus, "shard.index=0", "shard.count=2")
    part = first["splits"]["custom/train"]
    assert part["status"] == "incomplete" and part["missing_shards"] == [1, 3]
    out = Path(part["out_dir"])
    assert not (out / SUCCESS).exists()
    _, second = run(tmp_path, tiny_random_dir, corpus, "shard.index=1", "shard.count=2")
    assert second["splits"]["custom/train"]["status"] == "complete"
    rows = read_rows(out)
    ids = [r["id"] for r in rows]
    assert len(ids) == len(set(ids)) == 12  # no gaps, no duplicates
    assert rows == read_rows(reference[2])


def test_rank_split_is_a_partition_of_pending_shards(corpus):
    entry = DatasetEntry(name="c", path=str(corpus), duration_column="duration")
    ds = load_split(entry, "train", cache_dir=str(corpus / "cache"))
    spec = LabellingSpec(entry=entry, split="train", shard_size=2, done={1})
    source = LabellingSource(ds, spec, streaming=False)
    owned = [
        ShardBatches(source, None, 8, rank=r, world=3)._mine(range(source.num_shards), 1, 0) for r in range(3)
    ]
    flat = sorted(k for m in owned for k in m)
    assert flat == [k for k in range(source.num_shards) if k != 1]
    assert all(set(a).isdisjoint(b) for i, a in enumerate(owned) for b in owned[i + 1 :])


def test_two_cpu_processes_give_the_same_dataset(tmp_path, tiny_random_dir, corpus, reference):
    """The CPU default (`devices=auto`): forked single-threaded ranks, each writing its own shards. The split
    (14 units) is far smaller than `shard_size`, and `min_shards` still cuts it into shards for both ranks:
    ceil(14 / 4) = 4 units each, the reference's layout."""
    _, summary = run(
        tmp_path,
        tiny_random_dir,
        corpus,
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "shard_size=1000",
        "min_shards=4",
    )
    split = summary["splits"]["custom/train"]
    out = split_out(summary)
    assert split["status"] == "complete" and (out / SUCCESS).exists()
    assert read_rows(out) == read_rows(reference[2])
    assert (out / "skipped.jsonl").read_text() == (reference[2] / "skipped.jsonl").read_text()
    # Counted from every rank's manifests (the ranks ran in forked processes).
    assert split["this_run"]["samples"] == 14 and split["this_run"]["shards_written"] == 4
    assert split["this_run"]["audio_seconds"] == pytest.approx(
        reference[1]["splits"]["custom/train"]["this_run"]["audio_seconds"]
    )


def test_small_splits_are_cut_into_min_shards_shards_of_at_least_a_batch():
    assert split_shard_size(1065, 1000, 16, 16) == 67  # the 8x demo's espeak split: 16 shards, not 1000 + 65
    assert split_shard_size(114, 1000, 16, 16) == 16  # never below a batch: 8 shards of 16 (the last of 2)
    assert split_shard_size(5, 1000, 16, 16) == 16  # smaller than a batch: one shard
    assert split_shard_size(1_000_000, 1000, 16, 16) == 1000  # big splits keep shard_size
    assert split_shard_size(14, 4, 16, 4) == 4
    assert split_shard_size(None, 1000, 16, 16) == 1000  # a stream: its length is not known up front


def test_finished_labels_are_reused_under_another_shard_layout_but_not_resumed(
    tmp_path, tiny_random_dir, corpus, reference
):
    """The layout decides only how unfinished work resumes: a finished split is reused whatever it is now; an
    unfinished one is refused under another layout (its shards would not line up), naming the keys."""
    shutil.copytree(reference[2].parent.parent.parent, tmp_path / "pseudo_labels")
    _, summary = run(tmp_path, tiny_random_dir, corpus, "shard_size=2")
    assert summary["splits"]["custom/train"]["this_run"] is None
    with pytest.raises(RuntimeError, match="simulated kill"):
        run(tmp_path / "b", tiny_random_dir, corpus, callbacks=[KillAfterShards(1)])
    with pytest.raises(LabellingStateError, match="shard_size differ.*min_shards and batch_size"):
        run(tmp_path / "b", tiny_random_dir, corpus, "shard_size=2")


def test_parallelism_rule():
    # CPU, auto: one single-threaded process per core, but no more processes than shards to label.
    assert resolve_parallelism("auto", "auto", "auto", cpu=True, cores=8, work_items=100) == (
        8,
        "ddp_fork",
        1,
    )
    assert resolve_parallelism("auto", "auto", "auto", cpu=True, cores=8, work_items=3)[:1] == (3,)
    one = resolve_parallelism("auto", "auto", "auto", cpu=True, cores=8, work_items=1)
    assert one == (1, "auto", 8)  # a single shard: one process gets every core
    assert resolve_parallelism(2, "auto", "auto", cpu=True, cores=8) == (2, "ddp_fork", 4)
    assert resolve_parallelism("auto", "auto", 2, cpu=True, cores=8) == (4, "ddp_fork", 2)
    assert resolve_parallelism(2, "auto", "auto", cpu=True, cores=2, fork=False)[1] == "ddp_spawn"
    assert resolve_parallelism(2, "ddp", 1, cpu=True, cores=2) == (2, "ddp", 1)  # explicit wins
    # GPU: Lightning decides; threads untouched unless given.
    assert resolve_parallelism("auto", "auto", "auto", cpu=False, cores=8) == ("auto", "auto", None)
    assert resolve_parallelism(4, "auto", 3, cpu=False, cores=8) == (4, "auto", 3)


def test_streaming_gives_the_same_dataset(tmp_path, tiny_random_dir, corpus, reference):
    _, summary = run(tmp_path, tiny_random_dir, corpus, "streaming=true")
    assert read_rows(split_out(summary)) == read_rows(reference[2])


def test_pack_units_rule():
    durations = [10, 10, 10, 5, 3, None, 4, 4, 40, 2]
    speakers = ["A", "A", "A", "B", "B", "B", "B", "A", "A", "A"]
    skipped = []
    clips = [Clip(i, {"__id": str(i)}, d) for i, d in enumerate(durations)]
    units = list(pack_units(clips, lambda c: speakers[c.index], 25, skipped.append))
    assert [[c.index for c in u.clips] for u in units] == [[0, 1], [2], [3, 4], [6], [7], [9]]
    # [2] continues [0, 1] (same speaker, split by length); [3, 4] follows a speaker change; [6] follows a
    # dropped clip (5, unreadable); [7] a speaker change; [9] follows a dropped clip (8, too long).
    assert [u.continues for u in units] == [False, True, False, False, False, False]
    assert [(s.indices, s.reason) for s in skipped] == [([5], "unreadable_audio"), ([8], "too_long")]


def test_pack_units_with_drawn_limits_span_single_clips_to_full_windows():
    """packing.min_seconds: each unit packs up to its own limit, drawn in dataset order from one seeded
    generator (so every job and stream derives the same units); the first clip always opens a unit."""
    durations = [3.0] * 400
    speakers = ["A"] * 200 + ["B"] * 200
    clips = [Clip(i, {"__id": str(i)}, d) for i, d in enumerate(durations)]

    def pack(seed):
        units = list(pack_units(clips, lambda c: speakers[c.index], 30, [].append, min_seconds=0, seed=seed))
        return [[c.index for c in u.clips] for u in units]

    units = pack(7)
    assert units == pack(7) and units != pack(8)
    assert [i for u in units for i in u] == list(range(400))  # every clip once, in order
    sizes = [len(u) for u in units]
    assert min(sizes) == 1 and max(sizes) >= 9 and len(set(sizes)) >= 6
    draw = random.Random(7)
    for unit in units:  # each unit is maximal under its own limit, and never crosses a speaker change
        limit = draw.uniform(0, 30)
        assert len({speakers[i] for i in unit}) == 1
        assert len(unit) == 1 or 3.0 * len(unit) <= limit
        following = unit[-1] + 1
        if following < 400 and speakers[following] == speakers[unit[0]]:
            assert 3.0 * (len(unit) + 1) > limit
    plain = list(pack_units(clips, lambda c: speakers[c.index], 30, [].append))
    assert [len(u.clips) for u in plain] == [10] * 40  # without min_seconds: full windows
    with pytest.raises(ValueError, match="packing.min_seconds=40"):
        list(pack_units(clips, lambda c: speakers[c.index], 30, [].append, min_seconds=40))


def test_pack_units_with_single_probability_mixes_single_clips_and_full_windows():
    """packing.single_probability=p: a unit holds its first clip alone with probability p (one seeded draw per
    unit, in dataset order), else packs the full window; p=None draws nothing, so older plans are unchanged."""
    clips = [Clip(i, {"__id": str(i)}, 3.0) for i in range(1000)]

    def sizes(p, seed=5, min_seconds=None):
        units = pack_units(clips, lambda c: "A", 30, [].append, min_seconds, seed, single_probability=p)
        return [len(u.clips) for u in units]

    mixed = sizes(0.3)
    assert mixed == sizes(0.3) and mixed != sizes(0.3, seed=6)
    assert set(mixed[:-1]) == {1, 10} and sum(mixed) == 1000  # the last unit takes what is left
    draw = random.Random(5)
    assert mixed[:-1] == [1 if draw.random() < 0.3 else 10 for _ in mixed[:-1]]  # the rule, unit by unit
    singles = mixed.count(1) / len(mixed)
    assert 0.2 < singles < 0.4
    assert sizes(None) == sizes(0.0) == [10] * 100 and sizes(1.0) == [1] * 1000
    with_limits = sizes(0.5, min_seconds=0)  # both: singles, and the other units up to their drawn limit
    assert with_limits.count(1) > len(with_limits) / 2 and len(set(with_limits)) >= 6
    with pytest.raises(ValueError, match=r"packing.single_probability=1.5 must lie in \[0, 1\]"):
        sizes(1.5)


def test_build_prompt_is_never_doubled():
    assert build_prompt(" Hello there.") == "<|startofprev|> Hello there."
    assert build_prompt("<|startofprev|> Hello") == "<|startofprev|> Hello"
    assert build_prompt("") is None and build_prompt(None) is None


@pytest.mark.parametrize(
    ("streaming", "limits"),
    [(False, "packing.min_seconds=null"), (True, "packing.min_seconds=null"), (True, "packing.min_seconds=0"),
     (False, "packing.single_probability=0.5")],
)  # fmt: skip
def test_packing_respects_speakers_and_builds_prompts(
    tmp_path, tiny_random_dir, corpus, tts_clips, streaming, limits
):
    _, summary = run(
        tmp_path,
        tiny_random_dir,
        corpus,
        "packing.enabled=true",
        "packing.max_seconds=12",
        limits,
        f"streaming={streaming}",
    )
    rows = read_rows(split_out(summary))
    speaker_of = {f"clip-{i:02d}": s for i, s in enumerate(SPEAKERS)}
    text_of = {f"clip-{i:02d}": c["text"] for i, c in enumerate(tts_clips)}
    seconds_of = {f"clip-{i:02d}": len(c["audio"]) / 16000 for i, c in enumerate(tts_clips)}
    assert sorted(i for r in rows for i in r["packed_ids"]) == sorted(speaker_of)  # every good clip once
    assert any(len(r["packed_ids"]) > 1 for r in rows)
    previous = None
    for r in rows:
        assert {speaker_of[i] for i in r["packed_ids"]} == {r["speaker"]}  # never across speakers
        assert sum(seconds_of[i] for i in r["packed_ids"]) <= 12 + 1e-6
        assert r["text"] == " ".join(text_of[i] for i in r["packed_ids"])
        assert r["id"] == r["packed_ids"][0]
        # (a unit whose predecessor lost all its clips at decoding, a single bad clip, continues nothing)
        if r["pl_continues"]:
            assert previous is not None and previous["speaker"] == r["speaker"]
            assert previous["pl_index"] == r["pl_index"] - 1
            assert r["prompt"] == build_prompt(previous["pseudo_label"]) or (
                r["prompt"] is None and not previous["pseudo_label"].strip()
            )
        else:
            assert r["prompt"] is None
        if previous is not None and previous["speaker"] != r["speaker"]:
            assert not r["pl_continues"]  # a speaker change never gets a prompt
        previous = r
    assert any(r["pl_continues"] for r in rows)
    assert all(r["prompt"] is None or r["prompt"].count("<|startofprev|>") == 1 for r in rows)


def test_labelling_fills_the_encoder_cache_that_training_reads(tmp_path, tiny_random_dir, corpus):
    """With encoder_cache.enabled the labeller stores each packed unit's encoder output under the key the
    training collator computes for that label row: training's first epoch finds every state, and they are
    the encoder's output on the features training would have computed."""
    from omegaconf import OmegaConf

    from distil.data.encoder_cache import EncoderCache, cache_fingerprint
    from distil.datamodules.speech import SpeechDataModule
    from distil.whisper.models import load_whisper, weights_fingerprint

    cfg, summary = run(
        tmp_path, tiny_random_dir, corpus, "packing.enabled=true", "encoder_cache.enabled=true"
    )
    encoder = load_whisper(str(tiny_random_dir)).model.encoder
    fe = WhisperFeatureExtractor.from_pretrained(tiny_random_dir)
    cache = EncoderCache(cfg.encoder_cache.dir, cache_fingerprint(weights_fingerprint(encoder), fe))
    assert len(cache) == len(read_rows(split_out(summary))) > 1

    def first_batch(encoder_cache):
        dm = SpeechDataModule(
            OmegaConf.to_container(cfg.data.datasets, resolve=True),
            str(tiny_random_dir),
            pseudo_labels_dir=cfg.out_dir,
            batch_size=2,
            validation_splits=[],
            cache_dir=str(tmp_path / ".hf_cache"),
        )
        dm.encoder_cache = encoder_cache
        dm.setup("fit")
        return next(iter(dm.train_dataloader()))

    cached, computed = first_batch(cache), first_batch(None)
    assert cached["sample_ids"] == computed["sample_ids"]
    assert "input_features" not in cached  # found in the cache from the very first batch
    with torch.no_grad():
        expected = encoder(computed["input_features"]).last_hidden_state
    torch.testing.assert_close(cached["encoder_hidden_states"].float(), expected, rtol=1e-2, atol=1e-2)


def test_encoder_cache_is_refused_for_a_teacher_training_would_not_match(tmp_path, tiny_random_dir, corpus):
    with pytest.raises(DataConfigError, match="encoder_cache.enabled needs dtype=fp32"):
        run(tmp_path, tiny_random_dir, corpus, "dtype=bf16", "encoder_cache.enabled=true")


def test_encoder_cache_without_an_id_column_warns_and_stores_nothing(
    tmp_path, tiny_random_dir, corpus, caplog
):
    """Training keys cache entries by the id column; without one the labeller says so and stores nothing."""
    cfg, summary = run(
        tmp_path, tiny_random_dir, corpus, "data.datasets.0.id_column=null", "encoder_cache.enabled=true"
    )
    assert len(read_rows(split_out(summary))) == 12  # labelled as usual
    assert "custom has no id column (data.datasets[0].id_column)" in caplog.text
    assert not [f for f in Path(cfg.encoder_cache.dir).rglob("*") if f.is_file()]


def test_audio_only_data(tmp_path, tiny_random_dir, corpus):
    _, summary = run(
        tmp_path,
        tiny_random_dir,
        corpus,
        "data.datasets.0.text_column=null",
        "data.datasets.0.id_column=null",
    )
    split = summary["splits"]["custom/train"]
    rows = read_rows(split_out(summary))
    assert len(rows) == 12 and split["wer"] is None
    assert all(
        r["pl_wer"] is None and r["whisper_transcript"].startswith("<|startoftranscript|>") for r in rows
    )
    assert rows[0]["pl_id"] == "custom:train:0"  # generated stable ids (`id` exists as a plain column here)


def test_missing_column_is_reported_before_the_teacher_loads(tmp_path, corpus, monkeypatch):
    def no_teacher(*a, **k):
        raise AssertionError("teacher resolved before the data was checked")

    monkeypatch.setattr("distil.whisper.models.resolve_model", no_teacher)
    cfg = make_cfg(tmp_path, tmp_path / "no-model", corpus, "data.datasets.0.text_column=sentence")
    with pytest.raises(DataConfigError) as err:
        pseudo_label(cfg, run_dir=tmp_path / "run")
    for part in ("'custom'", "'train'", "'sentence'", "data.datasets[0].text_column", "'audio'"):
        assert part in str(err.value)


def test_bad_packing_limits_are_reported_before_the_teacher_loads(tmp_path, corpus, monkeypatch):
    def no_teacher(*a, **k):
        raise AssertionError("teacher resolved before the packing settings were checked")

    monkeypatch.setattr("distil.whisper.models.resolve_model", no_teacher)
    cfg = make_cfg(tmp_path, tmp_path / "no-model", corpus, "packing.enabled=true", "packing.min_seconds=40")
    with pytest.raises(DataConfigError, match=r"packing.min_seconds=40.* \[0, packing.max_seconds=30\]"):
        pseudo_label(cfg, run_dir=tmp_path / "run")


@pytest.mark.parametrize("key", ["shard_size", "min_shards", "batch_size"])
def test_a_shard_layout_setting_below_one_is_refused_by_the_schema(tmp_path, corpus, key):
    cfg = make_cfg(tmp_path, tmp_path / "no-model", corpus, f"{key}=0")
    with pytest.raises(ConfigError, match=rf"^{key} must be a positive integer, got 0$"):
        validate(cfg, "pseudo_label")  # the command's first step (distil.config.schema)


def test_language_for_english_only_teacher_is_an_error(tmp_path, tiny_random_dir, corpus, monkeypatch):
    def no_weights(*a, **k):
        raise AssertionError("weights loaded before the generation settings were checked")

    monkeypatch.setattr(WhisperForConditionalGeneration, "from_pretrained", no_weights)
    cfg = make_cfg(tmp_path, tiny_random_dir, corpus, "generation.language=fr")
    with pytest.raises(GenerationConfigError, match="English-only.*language='fr'"):
        pseudo_label(cfg, run_dir=tmp_path / "run")


def test_real_teacher_with_timestamps(tmp_path, tiny_en_dir, tts_clips):
    """tiny.en on three clips: sensible text, `<|0.00|>` timestamps, same tokens as generate() itself."""
    root = tmp_path / "data"
    (root / "train").mkdir(parents=True)
    rows = [
        {"audio": {"bytes": encode_flac(c["audio"], 16000), "path": None}, "text": c["text"], "id": str(i)}
        for i, c in enumerate(tts_clips[:3])
    ]
    datasets.Dataset.from_list(rows).to_parquet(str(root / "train" / "x.parquet"))
    cfg = make_cfg(
        tmp_path,
        tiny_en_dir,
        root,
        "generation.return_timestamps=true",
        "teacher.name=tiny-en",
        "data.datasets.0.speaker_column=null",
        "data.datasets.0.duration_column=null",
    )
    summary = pseudo_label(cfg, run_dir=tmp_path / "run")
    out = read_rows(split_out(summary))
    assert summary["splits"]["custom/train"]["wer"] < 30
    model = WhisperForConditionalGeneration.from_pretrained(tiny_en_dir).eval()
    fe = WhisperFeatureExtractor.from_pretrained(tiny_en_dir)
    for row, clip in zip(out, tts_clips[:3], strict=True):
        assert row["whisper_transcript"].startswith("<|startoftranscript|><|0.00|>")
        assert (
            row["whisper_transcript"].endswith("<|endoftext|>")
            and "<|notimestamps|>" not in row["whisper_transcript"]
        )
        feats = fe(clip["audio"], sampling_rate=16000, return_tensors="pt").input_features
        with torch.inference_mode():
            gen = model.generate(feats, return_timestamps=True, max_new_tokens=128)[0].tolist()
        assert row["token_ids"][1:-1] == gen  # generate() drops the start and end tokens


def test_timestamped_labels_are_one_pass_over_each_30s_window(tiny_en_dir, tts_clips):
    """A packed segment is labelled in one decoding pass, as the reference does: transformers 5 otherwise runs its
    long-form seek loop inside the window (a row whose last segment is cut off is decoded again from its last
    timestamp), which broke a batch sharing one encoder pass and relabelled the segment's tail."""
    from distil.modules.transcriber import WhisperTranscriber

    speech = np.concatenate([c["audio"] for c in tts_clips] * 2)  # > 30 s: the window ends mid-sentence
    waves = [speech[: 30 * 16000], tts_clips[0]["audio"]]
    transcriber = WhisperTranscriber(str(tiny_en_dir), {"return_timestamps": True, "max_new_tokens": 256})
    features = WhisperFeatureExtractor.from_pretrained(tiny_en_dir)(
        waves, sampling_rate=16000, return_tensors="pt"
    ).input_features
    out = transcriber.transcribe(features)
    gc = transcriber.generation_config
    first_timestamp = gc.no_timestamps_token_id + 1
    for ids in out["token_ids"]:
        assert ids[0] == gc.decoder_start_token_id and ids[1] == first_timestamp  # <|sot|><|0.00|>
        times = [(t - first_timestamp) * 0.02 for t in ids if t >= first_timestamp]
        assert times == sorted(times) and max(times) <= 30.0  # one window, never restarted at 0.00
    assert len(out["token_ids"][0]) > 60 and "<|endoftext|>" not in out["whisper_transcript"][0][:-13]


# The default run kills before the writes that decide completeness; `slow` before one write of every kind.
ESSENTIAL_WRITES = {"plan.json", "part-N.parquet", "part-N.json", SUCCESS}


@pytest.mark.parametrize("every_kind", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_a_kill_at_each_write_point_resumes_to_identical_output(
    tmp_path, tiny_random_dir, corpus, reference, every_kind
):
    """Every file the stage writes ends in an atomic os.replace: stop the process just before the k-th one
    (its temp file left behind, as a kill leaves it) and rerun. Before the rerun nothing may look complete;
    after it the output equals an uninterrupted run's and no temp file is left."""
    with atomic_writes() as written:
        run(tmp_path / "count", tiny_random_dir, corpus)
    calls = [p.name for p in written]
    assert SUCCESS in calls and sum(n.endswith(".parquet") for n in calls) == 4
    # The split's writes up to its _SUCCESS (the run directory's summary comes after), one of each kind:
    # shards 1-3 are written like shard 0.
    kinds = list(dict.fromkeys(write_kind(name) for name in calls[: calls.index(SUCCESS) + 1]))
    assert ESSENTIAL_WRITES <= set(kinds) and len(kinds) >= 6, kinds

    _, _, expected = reference
    for k, name in enumerate(w for w in kinds if every_kind or w in ESSENTIAL_WRITES):
        home = tmp_path / f"kill-{k}"
        with pytest.raises(SimulatedKill), atomic_writes(lambda dst, name=name: write_kind(dst) == name):
            run(home, tiny_random_dir, corpus)
        out = home / "pseudo_labels" / "whisper-tiny-random" / "custom" / "train"
        assert not (out / SUCCESS).exists(), f"kill before {name}: the split looks complete"
        for owner_file in [*out.rglob("*.claim"), *out.rglob("*.lock")]:  # a killed process is gone
            owner_file.write_text(json.dumps({**json.loads(owner_file.read_text()), "pid": dead_pid()}))
        _, summary = run(home, tiny_random_dir, corpus)
        assert summary["splits"]["custom/train"]["status"] == "complete", f"kill before {name}"
        assert read_rows(out) == read_rows(expected), f"kill before {name}"
        assert (out / "skipped.jsonl").read_text() == (expected / "skipped.jsonl").read_text()
        leftovers = [p for p in out.rglob("*") if ".tmp" in p.name]
        assert not leftovers, f"kill before {name}: {leftovers}"


def test_a_dataset_without_speakers_is_refused_or_labelled_clip_by_clip(tmp_path, tiny_random_dir, corpus):
    """Packing never crosses a speaker change, so a dataset without a speaker column cannot be packed: refused
    before the teacher loads, or (packing.without_speaker=clips) labelled one clip per unit, with a warning."""
    no_speaker = ("packing.enabled=true", "data.datasets.0.speaker_column=null")
    with pytest.raises(DataConfigError, match="needs a speaker column"):
        run(tmp_path / "refused", tmp_path / "no-model", corpus, *no_speaker)
    cfg, summary = run(tmp_path, tiny_random_dir, corpus, *no_speaker, "packing.without_speaker=clips")
    rows = read_rows(split_out(summary))
    assert len(rows) == len(SPEAKERS) and "packed_ids" not in rows[0]  # one clip a unit
    plan = json.loads((split_out(summary) / "_progress" / "plan.json").read_text())
    assert plan["packing"] is None
    typo = make_cfg(tmp_path / "typo", tiny_random_dir, corpus, *no_speaker, "packing.without_speaker=yes")
    with pytest.raises(
        ConfigError, match="packing.without_speaker must be null .refuse. or clips, got 'yes'"
    ):
        validate(typo, "pseudo_label")
