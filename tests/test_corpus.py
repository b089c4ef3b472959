"""Synthetic corpora: schema, held-out splits, determinism, idempotence, long-form, noise, bad input."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import distil.data.synthetic as corpus
from distil.data.audio import decode_audio, make_noise
from distil.data.synthetic_build import build_all
from distil.data.text import english_normalizer
from distil.data.tts import TTSUnavailable
from distil.utils.paths import CONF_DIR

TINY = [
    "corpora.espeak.sizes={train: 6, validation: 3, test: 4}",
    "corpora.flite.voices.train=[kal]",
    "corpora.flite.sizes={train: 2, validation: 0, test: 2}",
    "corpora.festival.sizes={train: 2, validation: 0, test: 1}",
    "corpora.longform.engine=espeak-ng",
    "+corpora.longform.rate=170",
    "corpora.longform.voices.test=[en-us+m1]",
    "corpora.longform.sizes.test=2",
    "corpora.longform.min_duration_s=8",
    "corpora.longform.max_duration_s=14",
    "noise.snr_db=10",
    "noise.type=[white,pink]",
    "noise.corpora=[espeak]",
    "shard_size=3",
]


@pytest.fixture(scope="module", autouse=True)
def hf_cache(tmp_path_factory):
    # load_dataset (non-streaming) caches Arrow files; keep them out of ~/.cache
    HF_CACHE["dir"] = str(tmp_path_factory.mktemp("hf_datasets"))


HF_CACHE: dict[str, str] = {}


def tiny_cfg(out_dir: Path, *extra: str) -> dict:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = compose(config_name="corpus", overrides=[*TINY, f"out_dir={out_dir}", *extra])
    return OmegaConf.to_container(cfg, resolve=True)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("corpora")
    cfg = tiny_cfg(out)
    return cfg, build_all(cfg)


def load(path: Path, split: str, streaming: bool = False):
    return datasets.load_dataset(
        "parquet", data_dir=str(path), split=split, streaming=streaming, cache_dir=HF_CACHE["dir"]
    )


def parquet_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.parquet"))}


# ---------------------------------------------------------------------------------------------


def test_sentence_bank_is_natural_english_at_scale():
    """The bundled bank: WordNet's usage examples (tens of thousands, many styles) + the normaliser sentences."""
    bank = corpus.load_sentences()
    wordnet = (corpus.RESOURCES / "wordnet_examples.txt").read_text().splitlines()
    assert len(bank) > 25_000 and set(wordnet) <= set(bank) and len(set(wordnet)) == len(wordnet)
    lengths = [len(s.split()) for s in wordnet]
    assert min(lengths) >= 5 and max(lengths) <= 30 and 7 < sum(lengths) / len(lengths) < 10
    assert len({s.split()[0] for s in wordnet}) > 2000  # not a few templates: thousands of openings
    assert sum(bool(re.search(r"\d", s)) for s in wordnet) > 300  # numbers kept
    assert sum(bool(re.search(r" [A-Z][a-z]+", s)) for s in wordnet) > 2000  # names kept
    assert all(not s[0].islower() and s[-1] in ".?!" for s in wordnet)
    assert (corpus.RESOURCES / "wordnet_LICENSE.txt").read_text().startswith("License: WordNet3.0")


def test_sentence_bank_has_short_utterances_the_normaliser_reads_like_whisper_writes():
    """WordNet's examples have five words or more: the bank's short utterances give the clips that end after
    one to four words (digit strings, dates, commands, answers), rewritten byte for byte by their script."""
    sys.path.insert(0, str(corpus.RESOURCES))
    try:
        import make_sentences
    finally:
        sys.path.pop(0)
    short = (corpus.RESOURCES / "short_utterances.txt").read_text().splitlines()
    assert short == make_sentences.build_short()
    bank = corpus.load_sentences()
    assert set(short) <= set(bank) and sum(len(s.split()) <= 4 for s in bank) >= 2000
    assert sum(len(s.split()) == 1 for s in short) > 200
    assert all(s[0].isupper() or s[0].isdigit() for s in short) and all(s[-1] in ".?" for s in short)
    # spoken digit strings and the digits Whisper writes for them normalise alike
    normalise = english_normalizer()
    digits = [
        s
        for s in short
        if re.fullmatch(r"([A-Z][a-z]+ )?([a-z]+ ){1,6}[a-z]+\.", s)
        and all(w in make_sentences.DIGIT_WORDS for w in s.lower().rstrip(".").split())
    ]
    assert len(digits) > 100
    for spoken in digits[:20]:
        written = "".join(
            str(make_sentences.DIGIT_WORDS.index(w)) for w in spoken.lower().rstrip(".").split()
        )
        assert normalise(spoken) == normalise(written), spoken


def test_wordnet_examples_become_spoken_sentences():
    sys.path.insert(0, str(corpus.RESOURCES))
    try:
        import extract_wordnet
    finally:
        sys.path.pop(0)
    assert extract_wordnet.as_sentence("the gutsy--and often funny--intensity of her voice") == (
        "The gutsy, and often funny, intensity of her voice."
    )
    assert (
        extract_wordnet.as_sentence("Is it raining in Boston at 5 o'clock?")
        == "Is it raining in Boston at 5 o'clock?"
    )
    for unspoken in [
        "a stiff current",
        "he paid $5 for it today",
        "the results (see above) were good",
        "and so on...",
    ]:
        assert extract_wordnet.as_sentence(unspoken) is None, unspoken
    if Path("/usr/share/wordnet/data.noun").is_file():  # Debian's wordnet-base (make setup installs it)
        sentences = (
            extract_wordnet.as_sentence(e) for e in extract_wordnet.examples(Path("/usr/share/wordnet"))
        )
        committed = (corpus.RESOURCES / "wordnet_examples.txt").read_text().splitlines()
        assert list(dict.fromkeys(s for s in sentences if s)) == committed


def test_normaliser_sentences_are_varied_and_reproducible():
    lines = (corpus.RESOURCES / "sentences.txt").read_text().splitlines()
    assert len(set(lines)) == len(lines) >= 1000
    text = "\n".join(lines)
    for pattern in [r"\bMr\. ", r"\bMrs\. ", r"\bDr\. ", r"\bSt\. ", r"\d+%", r"\b(19|20)\d\d\b", r"\b\d+(st|nd|rd|th)\b",
                    r"\d+:\d\d", r"\d+ dollars", r"\?$", r"!", r",", r"'"]:  # fmt: skip
        assert re.search(pattern, text, re.M), pattern
    assert sum(bool(re.search(r"\d", s)) for s in lines) > 300
    lengths = [len(s.split()) for s in lines]
    assert min(lengths) >= 5 and max(lengths) <= 20
    # many different sentence shapes, not one template: count distinct first two words
    assert len({" ".join(s.split()[:2]) for s in lines}) > 100
    # the committed file is exactly what the generator writes
    sys.path.insert(0, str(corpus.RESOURCES))
    try:
        import make_sentences
    finally:
        sys.path.pop(0)
    assert make_sentences.build() == lines


def test_schema_and_audio(built):
    cfg, paths = built
    assert set(paths) == {
        "espeak",
        "flite",
        "festival",
        "longform",
        "espeak_white_snr10",
        "espeak_pink_snr10",
    }
    full = datasets.load_dataset("parquet", data_dir=str(paths["espeak"]), cache_dir=HF_CACHE["dir"])
    assert set(full) == {"train", "validation", "test"}
    assert full["train"].num_rows == 6 and full["test"].num_rows == 4
    assert len(list((paths["espeak"] / "train").glob("*.parquet"))) == 2  # shard_size 3
    ds = full["train"]
    assert list(ds.features) == ["audio", "text", "id", "speaker", "duration"]
    assert isinstance(ds.features["audio"], datasets.Audio) and ds.features["audio"].decode is False
    assert ds.features["audio"].sampling_rate == 16000
    assert ds.features["duration"].dtype == "float64"
    bank = set(corpus.load_sentences())
    for name in ("espeak", "flite", "festival"):
        for row in load(paths[name], "train"):
            wave = decode_audio(row["audio"], 16000)
            assert row["audio"]["path"].endswith(".flac") and row["audio"]["bytes"][:4] == b"fLaC"
            assert row["duration"] == pytest.approx(wave.size / 16000, abs=1e-6)
            assert 1.0 < row["duration"] < 10.0
            assert row["text"] in bank
            engine = cfg["corpora"][name]["engine"]
            assert row["speaker"].startswith(f"{engine}:")
            assert np.max(np.abs(wave)) > 0.5  # speech, not silence
    ids = [r["id"] for split in ("train", "validation", "test") for r in load(paths["espeak"], split)]
    assert len(set(ids)) == len(ids)
    streamed = list(load(paths["espeak"], "test", streaming=True))
    assert [r["id"] for r in streamed] == load(paths["espeak"], "test")["id"]


def test_test_voices_and_sentences_are_held_out(built):
    _, paths = built
    rows = {
        (name, split): list(load(paths[name], split))
        for name in ("espeak", "flite", "festival")
        for split in ("train", "validation", "test")
        if (paths[name] / split).exists()
    }
    train_voices = {r["speaker"] for (_, split), rs in rows.items() if split == "train" for r in rs}
    train_text = {r["text"] for (_, split), rs in rows.items() if split == "train" for r in rs}
    test_rows = [r for (_, split), rs in rows.items() if split == "test" for r in rs]
    test_rows += list(load(paths["longform"], "test"))
    assert test_rows and not {r["speaker"] for r in test_rows} & train_voices
    longform_sentences = {
        s for r in load(paths["longform"], "test") for s in re.split(r"(?<=[.?!]) ", r["text"])
    }
    assert not ({r["text"] for r in test_rows} | longform_sentences) & train_text
    val = rows[("espeak", "validation")]
    assert not {r["text"] for r in val} & train_text  # new sentences ...
    assert {r["speaker"] for r in val} <= {
        r["speaker"] for r in rows[("espeak", "train")]
    }  # ... known voices


def test_rows_are_grouped_by_speaker_each_with_its_own_prosody(built):
    """Real corpora are ordered by speaker, and packing joins consecutive clips of one speaker."""
    cfg, paths = built
    speakers = load(paths["espeak"], "train")["speaker"]
    runs = [s for i, s in enumerate(speakers) if i == 0 or s != speakers[i - 1]]
    assert len(runs) == len(set(runs)) > 1  # each speaker's rows are contiguous
    spec = corpus.parse_spec("espeak", cfg["corpora"]["espeak"])
    plan = corpus.plan_corpus(
        spec, {s: [f"Sentence {i} is here." for i in range(50)] for s in corpus.SPLITS}, 0
    )
    by_voice = {}
    for item in plan.splits["train"]:
        by_voice.setdefault(item.voice, set()).add((item.tempo, item.pitch))
    assert all(len(prosody) == 1 for prosody in by_voice.values())  # one tempo and pitch per speaker
    tempos = {tempo for ((tempo, _),) in by_voice.values()}
    low, high = spec.tempo
    assert len(tempos) > 1 and all(low <= t <= high for t in tempos)
    assert corpus.speaker_prosody(spec, "en-us", 0) == corpus.speaker_prosody(spec, "en-us", 0)


def test_a_bigger_train_split_keeps_the_other_splits_and_extends_the_train_rows(built):
    """Each split is drawn on its own (conf/recipe/demo_long.yaml has four times the train clips): the test and
    validation rows stay the same and every row of the smaller train split is still there."""
    cfg, _ = built
    pools = {s: [f"Sentence {i} of {s} is here." for i in range(50)] for s in corpus.SPLITS}
    small = corpus.parse_spec("espeak", cfg["corpora"]["espeak"])
    sizes = dict(small.sizes)
    big = corpus.parse_spec(
        "espeak", {**cfg["corpora"]["espeak"], "sizes": {**sizes, "train": 2 * sizes["train"]}}
    )
    small_plan, big_plan = corpus.plan_corpus(small, pools, 0), corpus.plan_corpus(big, pools, 0)
    for split in set(sizes) - {"train"}:
        assert big_plan.splits.get(split) == small_plan.splits.get(split), split
    small_rows, big_rows = (
        {(i.voice, i.texts) for i in plan.splits["train"]} for plan in (small_plan, big_plan)
    )
    assert len(big_rows) == 2 * len(small_rows) and small_rows <= big_rows


def test_build_is_deterministic(built, tmp_path):
    cfg, paths = built
    again = build_all({**cfg, "out_dir": str(tmp_path)})
    for name, path in paths.items():
        first, second = parquet_bytes(path), parquet_bytes(again[name])
        assert first and first == second, name


def test_second_run_does_nothing_and_changed_config_rebuilds(tmp_path):
    cfg = tiny_cfg(tmp_path, "~corpora.flite", "~corpora.festival", "~corpora.longform", "noise.snr_db=null")
    path = build_all(cfg)["espeak"]
    marker = path / corpus.MARKER
    stamp = {p: p.stat().st_mtime_ns for p in [marker, *path.rglob("*.parquet")]}
    content = marker.read_text()
    build_all(cfg)
    assert {p: p.stat().st_mtime_ns for p in stamp} == stamp and marker.read_text() == content

    cfg["corpora"]["espeak"]["sizes"]["test"] = 2
    build_all(cfg)
    assert load(path, "test").num_rows == 2
    assert json.loads(marker.read_text())["config_hash"] != json.loads(content)["config_hash"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["espeak"]  # no temp/old dirs left


def test_longform_recordings(built):
    cfg, paths = built
    lf = cfg["corpora"]["longform"]
    ds = load(paths["longform"], "test")
    assert ds.num_rows == 2
    test_pool = set(
        corpus.partition_sentences(corpus.load_sentences(), cfg["sentence_pools"], cfg["seed"])["test"]
    )
    for row in ds:
        wave = decode_audio(row["audio"])
        assert lf["min_duration_s"] <= row["duration"] <= lf["max_duration_s"]
        assert row["duration"] == pytest.approx(wave.size / 16000, abs=1e-6)
        sentences = re.split(r"(?<=[.?!\"]) (?=[A-Z\"])", row["text"])
        assert len(sentences) >= 2 and set(sentences) <= test_pool
        assert row["speaker"] == "espeak-ng:en-us+m1"
        # the pauses between sentences are silent stretches of at least pause_s
        silent = np.abs(wave) < 1e-3
        runs = np.diff(np.flatnonzero(np.diff(np.concatenate([[0], silent.astype(int), [0]]))))[::2]
        assert (runs >= 0.9 * lf["pause_s"] * 16000).sum() >= len(sentences) - 1


def measured_snr(clean: np.ndarray, noisy: np.ndarray) -> float:
    # add_noise may rescale the mixture to avoid clipping: fit the clean gain, the rest is noise
    gain = float(np.dot(noisy, clean) / np.dot(clean, clean))
    residual = noisy - gain * clean
    return 10 * np.log10(np.mean((gain * clean) ** 2) / np.mean(residual**2))


@pytest.mark.parametrize("kind", ["white", "pink"])
def test_noisy_variant_has_requested_snr(built, kind):
    _, paths = built
    noisy_path = paths[f"espeak_{kind}_snr10"]
    assert [p.name for p in noisy_path.iterdir() if p.is_dir()] == ["test"]
    clean = {r["id"]: r for r in load(paths["espeak"], "test")}
    noisy = list(load(noisy_path, "test"))
    assert len(noisy) == len(clean)
    for row in noisy:
        ref = clean[row["id"]]
        assert row["text"] == ref["text"] and row["speaker"] == ref["speaker"]
        snr = measured_snr(decode_audio(ref["audio"]), decode_audio(row["audio"]))
        assert snr == pytest.approx(10.0, abs=0.5)


def test_make_noise_is_deterministic_and_shaped():
    white = make_noise("white", 32000, seed=1)
    assert np.array_equal(white, make_noise("white", 32000, seed=1))
    assert not np.array_equal(white, make_noise("white", 32000, seed=2))
    for kind in ("white", "pink", "brown"):
        noise = make_noise(kind, 32000, seed=3)
        assert noise.dtype == np.float32 and noise.shape == (32000,)
        assert np.sqrt(np.mean(noise**2)) == pytest.approx(1.0, rel=1e-3)

    def low_high(noise):
        power = np.abs(np.fft.rfft(noise)) ** 2
        freqs = np.fft.rfftfreq(noise.size, 1 / 16000)
        return power[(freqs > 50) & (freqs < 500)].mean() / power[(freqs > 4000) & (freqs < 7500)].mean()

    ratios = [low_high(make_noise(k, 32000, seed=4)) for k in ("white", "pink", "brown")]
    assert 0.7 < ratios[0] < 1.4 and ratios[1] > 5 * ratios[0] and ratios[2] > 5 * ratios[1]
    with pytest.raises(ValueError, match="babble"):
        make_noise("babble", 10, 0)


# --- bad input: clear errors, raised before any synthesis --------------------------------------


@pytest.fixture
def no_synthesis(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("synthesis started before the config was validated")

    monkeypatch.setattr("distil.data.synthetic_build.synthesize", fail)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("corpora.espeak.engine=mbrola", r"corpora\.espeak\.engine: unknown TTS engine 'mbrola'"),
        (
            "corpora.festival.voices.test=[bogus]",
            r"corpora\.festival\.voices\.test: festival has no voice 'bogus'",
        ),
        ("+corpora.flite.pitch=[20,40]", r"corpora\.flite\.pitch: only espeak-ng takes a pitch"),
        ("corpora.espeak.tempo=[1.2,0.9]", r"corpora\.espeak\.tempo: .* must be a number or \[low, high\]"),
        (
            "corpora.espeak.voices.train=[en-us,xx-nowhere]",
            r"corpora\.espeak\.voices\.train: espeak-ng has no voice 'xx-nowhere'",
        ),
        ("corpora.espeak.voices.test=[en-us+zz9]", r"corpora\.espeak\.voices\.test: .*variant 'zz9'"),
        ("corpora.flite.voices.test=[bogus]", r"corpora\.flite\.voices\.test: flite has no voice 'bogus'"),
        (
            "corpora.espeak.voices.test=[en-gb]",
            r"corpora\.espeak\.voices\.test: \['en-gb'\] also in voices\.train",
        ),
        (
            "corpora.longform.voices.test=[en-us]",
            r"corpora\.longform\.voices\.test: \['en-us'\] are train voices",
        ),
        (
            "corpora.espeak.sizes.train=10000000",
            r"corpora\.espeak\.sizes\.train: 10000000 utterances requested",
        ),
        ("noise.type=babble", r"noise\.type: unknown noise type 'babble'"),
        ("corpora.longform.sizes.test=0", r"corpora\.longform\.sizes: every split is empty"),
        ("+corpora.espeak.speed=2", r"corpora\.espeak: unknown key\(s\) \['speed'\]"),
    ],
)
def test_bad_config_is_rejected_before_synthesis(tmp_path, no_synthesis, override, message):
    cfg = tiny_cfg(tmp_path, override)
    with pytest.raises(corpus.CorpusConfigError, match=message):
        build_all(cfg)
    assert not any(tmp_path.iterdir())


def test_missing_engine_says_make_setup(tmp_path, monkeypatch, no_synthesis):
    monkeypatch.setattr("distil.data.tts.shutil.which", lambda exe: None)
    with pytest.raises(TTSUnavailable, match="make setup"):
        build_all(tiny_cfg(tmp_path))


def test_empty_or_small_sentence_file(tmp_path, no_synthesis):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    with pytest.raises(corpus.CorpusConfigError, match=f"sentences: file {empty} has no sentences"):
        build_all(tiny_cfg(tmp_path / "out", f"sentences={empty}"))
    with pytest.raises(corpus.CorpusConfigError, match="does not exist"):
        build_all(tiny_cfg(tmp_path / "out", f"sentences={tmp_path / 'missing.txt'}"))
    small = tmp_path / "small.txt"
    small.write_text("".join(f"Sentence number {i} is here.\n" for i in range(10)))
    # 10 sentences -> 2 in the test pool; 2 test voices can speak at most 4 distinct utterances
    with pytest.raises(
        corpus.CorpusConfigError, match=r"corpora\.espeak\.sizes\.test: 5 .* pool has 2 sentences x 2 voices"
    ):
        build_all(
            tiny_cfg(
                tmp_path / "out",
                f"sentences={small}",
                "sentence_pools={validation: 0.1, test: 0.2}",
                "corpora.espeak.voices.test=[en-us+m1,en-gb-x-rp]",
                "corpora.espeak.sizes.test=5",
            )
        )


def test_cli_entry_point(tmp_path):
    # the installed console script, which must find conf/ from anywhere
    cmd = [str(Path(sys.executable).parent / "distil-corpus"), f"paths.root={tmp_path}", "~corpora.flite", "~corpora.festival",
           "~corpora.longform", "corpora.espeak.sizes={train: 2, validation: 1, test: 1}"]  # fmt: skip
    result = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert load(tmp_path / "corpora" / "espeak", "validation").num_rows == 1
    assert list((tmp_path / "runs" / "corpus").glob("*/config.yaml"))  # run info written
