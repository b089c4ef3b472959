"""SpeechDataModule: weighted interleaving, WER/duration/length filters, collation, resume-exact batching."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from helpers import SR, WORDS, entry, wave, write_split

from distil.data.audio import encode_flac
from distil.data.entries import DataConfigError
from distil.data.targets import IGNORE_INDEX
from distil.data.text import compression_ratio
from distil.datamodules.collator import SpeechCollator
from distil.datamodules.filters import DataError, drop_reason, sampling_probabilities
from distil.datamodules.speech import SpeechDataModule
from distil.utils.errors import ConfigError

# =========================================================================== synthetic data (shared helpers)


def make_dm(tiny_dir, datasets, pl_root, **kw) -> SpeechDataModule:
    kw.setdefault("batch_size", 4)
    kw.setdefault("validation_splits", [])
    kw.setdefault("cache_dir", str(pl_root / ".hf_cache"))  # never the user's ~/.cache
    return SpeechDataModule(datasets, tiny_dir, pseudo_labels_dir=str(pl_root), **kw)


# =========================================================================== pure helpers


def test_sampling_probabilities_proportional_and_validated():
    assert sampling_probabilities([1, 3]) == [0.25, 0.75]
    assert sampling_probabilities([100.0, 360.0, 500.0]) == pytest.approx([100 / 960, 360 / 960, 500 / 960])
    with pytest.raises(DataError, match="positive"):
        sampling_probabilities([1, 0])
    with pytest.raises(DataError, match="empty"):
        sampling_probabilities([])


def test_wer_filter_is_strict_by_default_as_the_reference():
    wers = [0.0, 9.99, 10.0, 10.0001, 25.0, 100.0]
    assert [w for w in wers if drop_reason(w, 1.0, 10, wer_threshold=10.0) is None] == [0.0, 9.99]
    inclusive = [w for w in wers if drop_reason(w, 1.0, 10, wer_threshold=10.0, wer_inclusive=True) is None]
    assert inclusive == [0.0, 9.99, 10.0]
    assert drop_reason(150.0, 1.0, 10, wer_threshold=None) is None  # no threshold: everything kept
    # A reference that normalises to empty ('Mm-hmm.', '(laughs)') has no WER: dropped, never an error.
    assert drop_reason(None, 1.0, 10, wer_threshold=10.0) == "no_reference"
    assert drop_reason(float("nan"), 1.0, 10, wer_threshold=10.0) == "no_reference"
    assert drop_reason(None, 1.0, 10) is None  # without a threshold nothing needs a WER


def test_uppercase_and_truncated_labels_are_dropped():
    assert drop_reason(0.0, 1.0, 10, transcript="THE QUICK BROWN FOX.", drop_uppercase=True) == "uppercase"
    assert drop_reason(0.0, 1.0, 10, transcript="THE QUICK BROWN FOX.") is None  # the rule is an option
    for fine in ("The BBC said so.", "123", "", None):  # letters not all upper-case, or no letters at all
        assert drop_reason(0.0, 1.0, 10, transcript=fine, drop_uppercase=True) is None
    assert drop_reason(0.0, 1.0, 10, truncated=True, drop_truncated=True) == "truncated"
    assert drop_reason(0.0, 1.0, 10, truncated=True) is None


def test_duration_and_label_length_reasons():
    assert drop_reason(None, 0.2, 10, min_duration_s=0.5) == "too_short"
    assert drop_reason(None, 31.0, 10, max_duration_s=30.0) == "too_long"
    assert drop_reason(None, 5.0, 449, max_label_length=448) is None  # ids[:-1] still fits 448 positions
    assert drop_reason(None, 5.0, 450, max_label_length=448) == "label_too_long"


# =========================================================================== the DataModule


def test_interleave_frequencies_follow_weights(tmp_path, tiny_dir, tokenizer):
    write_split(tmp_path, "a", "train", 200, tokenizer)
    write_split(tmp_path, "b", "train", 200, tokenizer, id_offset=1000)
    dm = make_dm(
        tiny_dir,
        [entry("a", tmp_path, weight=1), entry("b", tmp_path, weight=3)],
        tmp_path,
        stopping_strategy="first_exhausted",
    )
    dm.setup("fit")
    sources = Counter(int(s) for s, _ in dm.mixture.epoch_pairs(0))
    frac_b = sources[1] / sum(sources.values())
    # first_exhausted stops when `b` (drawn 3x as often) runs out: ~267 draws, ~75% from b.
    assert 0.68 < frac_b < 0.82, sources
    assert sources[1] == 200  # b was exhausted exactly
    dm.max_train_samples = 10  # the dataset-size ablation: the first N samples of the same mixture
    assert np.array_equal(
        dm.build_mixture(dm.load_train_sources()).epoch_pairs(0), dm.mixture.epoch_pairs(0)[:10]
    )


def test_wer_filter_counts_and_kept_rows(tmp_path, tiny_dir, tokenizer):
    wers = [0.0, 5.0, 10.0, 10.5, 50.0, 9.0, 200.0, 10.0]
    write_split(tmp_path, "a", "train", len(wers), tokenizer, pl_wer=wers)
    dm = make_dm(tiny_dir, [entry("a", tmp_path)], tmp_path, wer_threshold=10.0, batch_size=2)
    dm.setup("fit")
    stats = dm.filter_stats["a/train"]
    assert (stats.total, stats.kept, dict(stats.dropped)) == (8, 3, {"wer": 5})
    kept_rows = sorted(int(r) for _, r in dm.mixture.epoch_pairs(0))
    assert kept_rows == [i for i, w in enumerate(wers) if w < 10.0]


def test_empty_references_are_dropped_and_counted_not_fatal(tmp_path, tiny_dir, tokenizer):
    wers = [0.0, None, 5.0, None, 50.0, 1.0]  # None: the reference normalised to empty
    write_split(tmp_path, "a", "train", len(wers), tokenizer, pl_wer=wers)
    dm = make_dm(tiny_dir, [entry("a", tmp_path)], tmp_path, wer_threshold=10.0, batch_size=2)
    dm.setup("fit")
    assert dict(dm.filter_stats["a/train"].dropped) == {"no_reference": 2, "wer": 1}
    assert sorted(int(r) for _, r in dm.mixture.epoch_pairs(0)) == [0, 2, 5]


def test_wer_threshold_on_a_dataset_without_references_is_a_clear_error(tmp_path, tiny_dir, tokenizer):
    write_split(tmp_path, "a", "train", 4, tokenizer, pl_wer=None)
    audio_only = {**entry("a", tmp_path), "text_column": None}
    dm = make_dm(tiny_dir, [audio_only], tmp_path, wer_threshold=10.0)
    with pytest.raises(DataError, match="wer_threshold is set but dataset 'a'.*no reference"):
        dm.setup("fit")
    make_dm(tiny_dir, [audio_only], tmp_path).setup("fit")  # without the threshold it trains


def test_wer_threshold_is_ignored_with_a_warning_on_reference_text(tmp_path, tiny_dir, caplog):
    write_split(tmp_path, "a", "train", 4, labelled=False)
    dm = SpeechDataModule(
        [entry("a", tmp_path)],
        tiny_dir,
        label_source="text",
        wer_threshold=10.0,
        batch_size=2,
        validation_splits=[],
        cache_dir=str(tmp_path / "hf"),
    )
    dm.setup("fit")
    assert dm.filter_stats["a/train"].kept == 4
    assert "wer_threshold=10.0 is ignored" in caplog.text


def test_uppercase_and_truncated_pseudo_labels_are_filtered(tmp_path, tiny_dir, tokenizer):
    eot = tokenizer.eos_token_id
    labels = [list(tokenizer(" " + t).input_ids) for t in ("one two", "three four", "five six", "seven")]
    labels[1] = labels[1][:-1]  # generation stopped at max_new_tokens: no <|endoftext|>
    write_split(
        tmp_path,
        "a",
        "train",
        4,
        tokenizer,
        extra_columns={"token_ids": labels, "pseudo_label": ["one two", "three four", "FIVE SIX", "seven"]},
    )
    assert labels[0][-1] == eot
    dm = make_dm(tiny_dir, [entry("a", tmp_path)], tmp_path, batch_size=2)
    dm.setup("fit")
    assert dict(dm.filter_stats["a/train"].dropped) == {"truncated": 1, "uppercase": 1}
    off = make_dm(tiny_dir, [entry("a", tmp_path)], tmp_path, drop_uppercase=False, drop_truncated=False)
    off.setup("fit")
    assert off.filter_stats["a/train"].kept == 4


def test_hallucination_signals_drop_labels_without_needing_references(tmp_path, tiny_dir, tokenizer):
    """Audio-only data has no WER: a looping label (it compresses too well) and one with more tokens than anyone
    speaks in its audio are dropped and counted by reason."""
    texts = ["one two", "go " * 30, "a perfectly ordinary sentence of a few words", "seven"]
    labels = [list(tokenizer(" " + t.strip()).input_ids) for t in texts]
    write_split(
        tmp_path,
        "a",
        "train",
        4,
        tokenizer,
        durations=[1.0, 10.0, 1.0, 1.0],  # the third: 9 words in one second
        extra_columns={"token_ids": labels, "pseudo_label": texts},
    )
    assert compression_ratio(texts[1]) > 2.4 > compression_ratio(texts[2])
    dm = make_dm(
        tiny_dir, [entry("a", tmp_path)], tmp_path, max_compression_ratio=2.4, max_tokens_per_second=6
    )
    dm.setup("fit")
    assert dict(dm.filter_stats["a/train"].dropped) == {"compression_ratio": 1, "tokens_per_second": 1}
    off = make_dm(tiny_dir, [entry("a", tmp_path)], tmp_path)
    off.setup("fit")
    assert off.filter_stats["a/train"].kept == 4
    with pytest.raises(ConfigError, match=r"data.max_tokens_per_second=-1"):
        make_dm(tiny_dir, [entry("a", tmp_path)], tmp_path, max_tokens_per_second=-1)


def test_first_exhausted_draws_a_new_subset_every_epoch(tmp_path, tiny_dir, tokenizer):
    write_split(tmp_path, "small", "train", 10, tokenizer)
    write_split(tmp_path, "big", "train", 100, tokenizer, id_offset=1000)
    dm = make_dm(
        tiny_dir,
        [entry("small", tmp_path), entry("big", tmp_path)],
        tmp_path,
        stopping_strategy="first_exhausted",
    )
    dm.setup("fit")
    epochs = [dm.mixture.epoch_pairs(e) for e in range(4)]
    big_rows = [{int(r) for s, r in pairs if s == 1} for pairs in epochs]
    assert all(len(rows) < 30 for rows in big_rows)  # each epoch stops when `small` runs out
    assert len(set().union(*big_rows)) > 1.8 * max(len(rows) for rows in big_rows)  # other rows each epoch
    assert np.array_equal(dm.mixture.epoch_pairs(2), epochs[2])  # seeded: the same again
    # the batches follow the per-epoch draw
    steps = len(epochs[0]) // 4
    seen = {k for ids in _ids(dm.train_dataloader(), steps) for k in ids}
    assert {k for k in seen if k.startswith("big/")} <= {f"big/train/big-{1000 + r}" for r in big_rows[0]}


def test_splits_of_one_entry_take_their_own_weights(tmp_path, tiny_dir, tokenizer):
    for split in ("clean", "other"):
        write_split(tmp_path, "libri", split, 200, tokenizer)
    weighted = {**entry("libri", tmp_path, splits=["clean", "other"]), "weight": [1, 3]}
    dm = make_dm(tiny_dir, [weighted], tmp_path, stopping_strategy="first_exhausted")
    dm.setup("fit")
    sources = Counter(int(s) for s, _ in dm.mixture.epoch_pairs(0))
    assert 0.68 < sources[1] / sum(sources.values()) < 0.82, sources
    named = {**weighted, "weight": {"clean": 1, "othr": 3}}
    with pytest.raises(DataConfigError, match=r"weight names splits \['clean', 'othr'\]"):
        make_dm(tiny_dir, [named], tmp_path)
    with pytest.raises(DataConfigError, match="2 splits"):
        make_dm(tiny_dir, [{**weighted, "weight": [1, 2, 3]}], tmp_path)


def test_finetuning_multilingual_uses_each_datasets_language(tmp_path, base_dir):
    from transformers import WhisperTokenizerFast

    tok = WhisperTokenizerFast.from_pretrained(base_dir)
    for name in ("en_set", "de_set"):
        write_split(tmp_path, name, "train", 4, labelled=False)
    entries = [
        {**entry("en_set", tmp_path), "language": "en"},
        {**entry("de_set", tmp_path), "language": "de"},
    ]
    dm = SpeechDataModule(
        entries,
        str(base_dir),
        label_source="text",
        batch_size=8,
        shuffle=False,
        validation_splits=[],
        cache_dir=str(tmp_path / "hf"),
    )
    dm.setup("fit")  # data.language is not set: each dataset's own language is used
    batch = next(iter(dm.train_dataloader()))
    languages = {
        sid.split("/")[0]: tok.convert_ids_to_tokens(int(ids[1]))
        for sid, ids in zip(batch["sample_ids"], batch["decoder_input_ids"], strict=True)
    }
    assert languages == {"en_set": "<|en|>", "de_set": "<|de|>"}


def test_missing_pseudo_labels_and_unknown_column_are_clear_errors(tmp_path, tiny_dir, tokenizer):
    write_split(tmp_path / "corpus", "a", "train", 4, labelled=False)
    dm = make_dm(tiny_dir, [entry("a", tmp_path / "corpus")], tmp_path / "pl")
    with pytest.raises(DataError, match="pseudo_label"):
        dm.setup("fit")
    write_split(tmp_path, "b", "train", 4, tokenizer)
    bad = {**entry("b", tmp_path), "text_column": "sentence"}
    with pytest.raises(DataError, match="no column 'sentence'.*text_column"):
        make_dm(tiny_dir, [bad], tmp_path).setup("fit")


def test_duration_filter_reports_drops(tmp_path, tiny_dir, tokenizer):
    write_split(tmp_path, "a", "train", 6, tokenizer, durations=[0.3, 1.0, 1.0, 0.2, 1.0, 1.0])
    dm = make_dm(tiny_dir, [entry("a", tmp_path)], tmp_path, min_duration_s=0.5, batch_size=2)
    dm.setup("fit")
    assert dict(dm.filter_stats["a/train"].dropped) == {"too_short": 2}


def test_collator_pads_to_longest_and_computes_features(tmp_path, tiny_dir, tokenizer):
    write_split(tmp_path, "a", "train", 8, tokenizer)
    dm = make_dm(tiny_dir, [entry("a", tmp_path)], tmp_path, batch_size=4)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_features"].shape == (4, 80, 3000)
    labels, inputs = batch["labels"], batch["decoder_input_ids"]
    lengths = (labels != IGNORE_INDEX).sum(1)
    assert labels.shape[1] == int(lengths.max()) < 448  # padded to the longest, not to 448
    assert inputs.shape == labels.shape
    # decoder_input_ids[t + 1] == labels[t] on real tokens (shift by one)
    for row in range(4):
        n = int(lengths[row])
        assert torch.equal(inputs[row, 1:n], labels[row, : n - 1])
        assert labels[row, n - 1] == tokenizer.eos_token_id
    assert len(batch["sample_ids"]) == 4 and all(k.startswith("a/train/") for k in batch["sample_ids"])


def test_collator_features_stay_fp32_under_bf16_autocast(tmp_path, tiny_dir, tokenizer):
    """A bf16 run that collates inside autocast (no DataLoader workers) still gets fp32 log-mel features."""
    write_split(tmp_path, "a", "train", 4, tokenizer)
    dm = make_dm(tiny_dir, [entry("a", tmp_path)], tmp_path, batch_size=4)
    dm.setup("fit")
    plain = next(iter(dm.train_dataloader()))["input_features"]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = next(iter(dm.train_dataloader()))["input_features"]
    assert under_autocast.dtype == torch.float32
    assert torch.equal(under_autocast, plain)


def test_finetune_labels_come_from_text(tmp_path, tiny_dir, tokenizer):
    write_split(tmp_path, "a", "train", 4, labelled=False)
    dm = SpeechDataModule(
        [entry("a", tmp_path)],
        tiny_dir,
        label_source="text",
        batch_size=4,
        validation_splits=[],
        cache_dir=str(tmp_path / "hf"),
    )
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    texts = tokenizer.batch_decode(
        torch.where(batch["labels"] < 0, tokenizer.eos_token_id, batch["labels"]), skip_special_tokens=True
    )
    assert all(t.strip().split()[0] in WORDS for t in texts)
    assert batch["decoder_input_ids"][0, :2].tolist() == tokenizer.convert_tokens_to_ids(
        ["<|startoftranscript|>", "<|notimestamps|>"]
    )


def _ids(loader, n):
    out = []
    for i, batch in enumerate(loader):
        if i == n:
            break
        out.append(tuple(batch["sample_ids"]))
    return out


def test_batches_deterministic_across_workers_epochs_and_resume(tmp_path, tiny_dir, tokenizer):
    write_split(tmp_path, "a", "train", 10, tokenizer)
    dm = make_dm(tiny_dir, [entry("a", tmp_path)], tmp_path, batch_size=3)
    dm.setup("fit")
    order = _ids(dm.train_dataloader(), 7)  # 3 batches per epoch (last partial one dropped): crosses 2 epochs
    assert len(order) == 7
    assert sorted(sum(order[:3], ())) != sorted(sum(order[3:6], ())) or order[:3] != order[3:6]  # reshuffled
    dm.num_workers = 2
    assert _ids(dm.train_dataloader(), 7) == order  # same global order with workers
    dm.num_workers = 0
    loader = dm.train_dataloader()
    dm.train_stream.start_batch = 4  # resume after 4 batches
    assert _ids(loader, 3) == order[4:7]


def test_validation_sets_are_named_and_use_references(tmp_path, tiny_dir, tokenizer):
    write_split(tmp_path / "pl", "a", "train", 4, tokenizer)
    write_split(tmp_path / "corpus", "a", "validation", 5, labelled=False)
    extra = {**entry("ood", tmp_path / "corpus", splits=["test"])}
    write_split(tmp_path / "corpus", "ood", "test", 3, labelled=False)
    dm = SpeechDataModule(
        [entry("a", tmp_path / "corpus")],
        tiny_dir,
        pseudo_labels_dir=str(tmp_path / "pl"),
        validation_splits=["validation"],
        validation_datasets=[extra],
        batch_size=2,
        val_batch_size=4,
        cache_dir=str(tmp_path / "hf"),
    )
    dm.setup("fit")
    assert dm.val_names == ["a/validation", "ood/test"]
    loaders = dm.val_dataloader()
    assert [len(ds) for ds in dm.val_sets] == [5, 3]
    batch = next(iter(loaders[0]))
    assert batch["input_features"].shape[0] == 4 and batch["references"][0].split()[0] in WORDS
    # max_val_samples takes rows spread over the split (corpora are ordered by speaker), not the first ones
    from distil.datamodules.validation import load_validation_sets

    _, (capped,) = load_validation_sets([(dm.entries[0], "validation")], max_samples=2)
    assert [row["sample_id"] for row in capped] == [dm.val_sets[0][i]["sample_id"] for i in (0, 2)]


def test_streaming_matches_filters_and_mixes(tmp_path, tiny_dir, tokenizer, monkeypatch):
    import datasets

    # datasets sleeps 5 s whenever an interleaved parquet stream ends (a pyarrow shutdown workaround)
    monkeypatch.setattr(datasets.config, "SLEEP_TIME_ON_THREADS_SHUTDOWN", 0.05)
    write_split(tmp_path, "a", "train", 12, tokenizer, pl_wer=[0.0, 50.0] * 6)
    write_split(tmp_path, "b", "train", 12, tokenizer, pl_wer=[0.0] * 12, id_offset=100)
    dm = make_dm(
        tiny_dir,
        [entry("a", tmp_path), entry("b", tmp_path)],
        tmp_path,
        streaming=True,
        wer_threshold=10.0,
        batch_size=4,
        shuffle_buffer_size=8,
    )
    dm.setup("fit")
    assert dm.filter_stats["a/train"].kept == 6 and dm.filter_stats["b/train"].kept == 12
    seen = [k for ids in _ids(dm.train_dataloader(), 4) for k in ids]
    assert {k.split("/")[0] for k in seen} == {"a", "b"}
    bad = {f"a/train/a-{i}" for i in range(1, 12, 2)}  # pl_wer 50 -> dropped
    assert not bad & set(seen)


def test_cache_key_names_the_audio_not_only_its_place(tmp_path):
    from distil.data.encoder_cache import cache_key

    by_bytes = cache_key("a/train", "7", {"bytes": b"sound", "path": "x.flac"})
    assert by_bytes == cache_key("a/train", "7", {"bytes": b"sound", "path": None})  # the bytes decide
    assert by_bytes != cache_key("a/train", "7", {"bytes": b"other sound", "path": "x.flac"})
    assert by_bytes.startswith("a/train/7/")
    clip = (
        tmp_path / "clip.flac"
    )  # audio stored as a path only: a file replaced under that name is another key
    clip.write_bytes(b"first")
    before = cache_key("a/train", "7", {"bytes": None, "path": str(clip)})
    clip.write_bytes(b"second take")
    assert cache_key("a/train", "7", {"bytes": None, "path": str(clip)}) != before


def test_collator_uses_encoder_cache(tmp_path, tiny_dir, tokenizer):
    from transformers import WhisperFeatureExtractor

    from distil.data.encoder_cache import EncoderCache

    cache = EncoderCache(tmp_path / "cache", "fp")
    collator = SpeechCollator(
        WhisperFeatureExtractor.from_pretrained(tiny_dir), tokenizer, encoder_cache=cache
    )
    rows = [
        {
            "audio": {"bytes": encode_flac(wave(0.5, i), SR), "path": None},
            "sample_id": str(i),
            "source": "a/train",
            "token_ids": list(tokenizer(" hello").input_ids),
            "text": "hello",
        }
        for i in range(2)
    ]
    first = collator(rows, epoch=0)
    assert "input_features" in first and "encoder_hidden_states" not in first
    cache.save(first["cache_keys"], torch.randn(2, 1500, 8))
    second = collator(rows, epoch=1)
    assert "input_features" not in second and second["encoder_hidden_states"].dtype == torch.float16
    assert second["encoder_hidden_states"].shape == (2, 1500, 8)
    # The same ids with other audio (a rebuilt corpus) are other keys: no stale encoder states are read.
    rebuilt = [{**row, "audio": {"bytes": encode_flac(wave(0.7, 5), SR), "path": None}} for row in rows]
    third = collator(rebuilt, epoch=2)
    assert third["sample_ids"] == second["sample_ids"] and set(third["cache_keys"]).isdisjoint(
        second["cache_keys"]
    )
    assert "input_features" in third and "encoder_hidden_states" not in third


def test_streaming_ranks_and_workers_each_read_only_their_part(tmp_path, tiny_dir, tokenizer, monkeypatch):
    """2 ranks x 2 workers over a 4-shard stream: every sample once per epoch, each process reading only its
    own rows (so it can decode no others); a resumed process continues exactly where it stopped."""
    import types

    import datasets
    import pyarrow.parquet as pq

    from distil.datamodules import training_splits as sources
    from distil.datamodules.mixture import TrainStream

    monkeypatch.setattr(datasets.config, "SLEEP_TIME_ON_THREADS_SHUTDOWN", 0.05)
    out = write_split(tmp_path, "a", "train", 32, tokenizer)
    table = pq.read_table(out / "part-00000.parquet")
    (out / "part-00000.parquet").unlink()
    for i in range(4):  # four shards, as a Hub dataset has many
        pq.write_table(table.slice(8 * i, 8), out / f"part-{i:05d}.parquet")
    dm = make_dm(tiny_dir, [entry("a", tmp_path)], tmp_path, streaming=True, batch_size=2)
    dm.setup("fit")
    assert dm.filter_stats["a/train"].kept == 32

    read = []
    real_row = sources.canonical_row

    def reading(row, entry_, split, index):
        out = real_row(row, entry_, split, index)
        read.append(out["sample_id"])
        return out

    monkeypatch.setattr(sources, "canonical_row", reading)

    def run(rank, worker, start_batch=0):
        info = types.SimpleNamespace(id=worker, num_workers=2)
        monkeypatch.setattr(torch.utils.data, "get_worker_info", lambda: info)
        # a collator stand-in: the batch's ids (decoding is the real collator's, tested above)
        ids_only = lambda rows, epoch: {"sample_ids": tuple(r["sample_id"] for r in rows)}  # noqa: E731
        stream = TrainStream(dm.mixture, ids_only, 2, seed=0, rank=rank, world_size=2, max_epochs=1)
        stream.start_batch = start_batch
        read.clear()
        return [b["sample_ids"] for b in stream], list(read)

    seen = []
    for rank in (0, 1):
        for worker in (0, 1):
            batches, rows_read = run(rank, worker)
            ids = [i for b in batches for i in b]
            assert len(ids) == 8 and set(rows_read) == set(ids)  # one shard each, nothing else read
            seen += ids
            # resume after 6 global batches: 3 per rank, taken round-robin from its workers (2 from worker 0)
            resumed, _ = run(rank, worker, start_batch=6)
            assert resumed == batches[2 - worker :]
    assert sorted(seen) == sorted(f"a-{i}" for i in range(32))  # every sample exactly once
