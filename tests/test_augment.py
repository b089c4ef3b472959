"""Training-time augmentation (issue 35, items 1 and 2): SpecAugment on the features, consistent by construction
(student and teacher read one masked tensor; masks a function of seed, step and batch index), and BPE dropout on
the labels (same text, other segmentation; special tokens untouched)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_distiller import batch, student_dir  # noqa: F401  (fixtures)
from test_train import compose_train, home, models_root  # noqa: F401  (fixtures)

from distil.modules.distiller import WhisperDistiller
from distil.training.augment import SpecAugment, apply_specaugment, specaugment_masks, specaugment_seed
from distil.utils.errors import ConfigError

SPEC = {"enabled": True, "mask_time_prob": 0.2, "mask_time_length": 10, "mask_feature_prob": 0.2}


@pytest.mark.unit
def test_specaugment_masks_are_a_function_of_seed_step_and_batch_index():
    spec = SpecAugment.from_config(SPEC)
    shape = (3, 80, 3000)
    seed = specaugment_seed(0, 7, 14)
    assert seed == specaugment_seed(0, 7, 14)  # what a resumed run at step 7 computes for batch 14
    np.random.seed(123)
    before = np.random.get_state()[1].copy()
    time, feature = specaugment_masks(shape, spec, seed)
    assert (np.random.get_state()[1] == before).all()  # numpy's global generator is left where it was
    again = specaugment_masks(shape, spec, seed)
    assert torch.equal(time, again[0]) and torch.equal(feature, again[1])
    # non-trivial: about mask_prob of each axis, at least one span per sample, never the whole axis
    assert time.shape == (3, 3000) and feature.shape == (3, 80)
    assert (time.sum(1) >= 10).all() and (time.float().mean() < 0.25)
    assert (feature.sum(1) >= 1).all() and (feature.float().mean() <= 0.25)
    # another step, batch or run seed: other masks
    for other in (specaugment_seed(0, 8, 14), specaugment_seed(0, 7, 15), specaugment_seed(1, 7, 14)):
        assert not torch.equal(time, specaugment_masks(shape, spec, other)[0])
    # the masked features: zero exactly where a mask is, the rest untouched
    feats = torch.rand(shape) + 1.0  # positive everywhere: a masked value (0) is told from the input
    masked = apply_specaugment(feats, spec, seed)
    hidden = time[:, None, :] | feature[:, :, None]
    assert (masked[hidden] == 0).all() and torch.equal(masked[~hidden], feats[~hidden])
    assert not torch.equal(masked, feats) and feats.min() > 0  # the input itself is not changed


@pytest.mark.unit
def test_specaugment_settings_and_masks_that_do_not_fit_are_refused():
    assert SpecAugment.from_config({"enabled": False, "mask_time_prob": 0.5}) is None
    assert SpecAugment.from_config(None) is None
    assert SpecAugment.from_config({"enabled": True}) == SpecAugment(enabled=True)  # WhisperConfig's defaults
    with pytest.raises(ConfigError, match=r"^augment.specaugment has no key\(s\) \['mask_prob'\]"):
        SpecAugment.from_config({"enabled": True, "mask_prob": 0.1})
    with pytest.raises(
        ConfigError, match=r"^augment.specaugment.mask_feature_length=100 is longer than the "
    ):
        SpecAugment(enabled=True, mask_feature_prob=0.1, mask_feature_length=100).check(80)
    with pytest.raises(ConfigError, match=r"^augment.specaugment.mask_time_length=3001 is longer than the "):
        SpecAugment(enabled=True, mask_time_length=3001).check(80)


class EncoderInputs:
    """Records the features each encoder (student, teacher) is called with."""

    def __init__(self, module: WhisperDistiller, when=lambda: True):
        self.seen: dict[str, list[torch.Tensor]] = {"student": [], "teacher": []}
        for name, model in (("student", module.student), ("teacher", module.teacher)):
            model.model.encoder.register_forward_pre_hook(self._hook(name, when))

    def _hook(self, name, when):
        def hook(_module, args):
            if when():
                self.seen[name].append(args[0].detach().clone())

        return hook


def test_student_and_teacher_encoders_read_the_same_masked_features(student_dir, tiny_dir, batch):  # noqa: F811
    # separate encoders (the shared one runs once, for both): each gets the masked tensor
    module = WhisperDistiller(student_dir, tiny_dir, share_encoder=False, specaugment=SPEC, seed=5)
    inputs = EncoderInputs(module)
    stepped = module.augment_features(batch, batch_idx=3)
    with torch.no_grad():
        module.compute_loss(stepped)
    (student,), (teacher,) = inputs.seen["student"], inputs.seen["teacher"]
    assert torch.equal(student, teacher)
    expected = apply_specaugment(batch["input_features"], module.specaugment, specaugment_seed(5, 0, 3))
    assert torch.equal(student, expected) and not torch.equal(student, batch["input_features"])
    assert "teacher_input_features" not in stepped
    # the ablation: the teacher reads the clean features
    ablation = WhisperDistiller(
        student_dir, tiny_dir, share_encoder=False, specaugment={**SPEC, "consistent": False}, seed=5
    )
    inputs = EncoderInputs(ablation)
    with torch.no_grad():
        ablation.compute_loss(ablation.augment_features(batch, batch_idx=3))
    assert torch.equal(inputs.seen["student"][0], expected)
    assert torch.equal(inputs.seen["teacher"][0], batch["input_features"])
    # the shared frozen encoder: one pass, on the masked tensor, for both models
    shared = WhisperDistiller(student_dir, tiny_dir, specaugment=SPEC, seed=5)
    assert shared.share_encoder
    inputs = EncoderInputs(shared)
    with torch.no_grad():
        shared.compute_loss(shared.augment_features(batch, batch_idx=3))
    assert len(inputs.seen["student"]) == 1 and not inputs.seen["teacher"]
    assert torch.equal(inputs.seen["student"][0], expected)
    # off: nothing changes
    off = WhisperDistiller(student_dir, tiny_dir, specaugment={**SPEC, "enabled": False})
    assert off.augment_features(batch) is batch


def test_specaugment_with_a_longer_mask_than_the_mel_bins_is_refused_naming_the_key(student_dir, tiny_dir):  # noqa: F811
    with pytest.raises(ConfigError, match=r"^augment.specaugment.mask_feature_length=100 .*\(80 mel bins\)"):
        WhisperDistiller(student_dir, tiny_dir, specaugment={**SPEC, "mask_feature_length": 100})


# a 2-step training run (~3 s)
def test_a_training_step_gives_student_and_teacher_the_same_masked_features(home, tmp_path):  # noqa: F811
    """A real run (separate, frozen encoders): at every step both encoders read one tensor, the batch's features
    masked with the masks of (seed, global step, batch index); validation reads clean features."""
    import lightning as L

    from distil.train import run_config, train

    seen: dict[str, list] = {}

    class Watch(L.Callback):
        def on_fit_start(self, trainer, module):
            seen["inputs"] = EncoderInputs(module, when=lambda: trainer.training)
            seen["clean"], seen["spec"] = [], module.specaugment

        def on_train_batch_start(self, trainer, module, rows, batch_idx):
            seed = specaugment_seed(0, trainer.global_step, rows["batch_index"])
            seen["clean"].append((rows["input_features"].clone(), seed))

    cfg = compose_train(
        home,
        [
            "out_dir=" + str(tmp_path / "run"),
            "export=false",
            "model.share_encoder=false",
            "augment.specaugment.enabled=true",
            "augment.specaugment.mask_feature_prob=0.2",
        ],
        steps=2,
    )
    assert run_config(cfg)["augment.specaugment.enabled"] is True  # recorded in run_config.json
    train(cfg, callbacks=[Watch()])
    inputs = seen["inputs"].seen
    assert len(inputs["student"]) == len(inputs["teacher"]) == len(seen["clean"]) == 2
    for student, teacher, (clean, seed) in zip(
        inputs["student"], inputs["teacher"], seen["clean"], strict=True
    ):
        assert torch.equal(student, teacher)
        assert torch.equal(student.cpu(), apply_specaugment(clean.cpu(), seen["spec"], seed))
        assert not torch.equal(student.cpu(), clean.cpu())


def test_the_augment_keys_are_recorded_and_older_records_read_them_as_off(tmp_path):
    from hydra import compose, initialize_config_dir

    from distil.train import ADDED_SETTINGS, RUN_CONFIG, check_run_config, run_config
    from distil.utils.io import write_json_atomic
    from distil.utils.paths import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        settings = run_config(compose("train"))
    recorded = {k: v for k, v in settings.items() if k.startswith("augment.")}
    # every augment key has its default in ADDED_SETTINGS (a run recorded before them resumes), and it is off
    assert recorded == {k: v for k, v in ADDED_SETTINGS.items() if k.startswith("augment.")}
    assert recorded["augment.specaugment.enabled"] is False
    write_json_atomic(tmp_path / RUN_CONFIG, {k: v for k, v in settings.items() if k not in recorded})
    assert check_run_config(tmp_path, settings, resuming=True, force=False) == []


# ------------------------------------------------------------------ BPE dropout


def label_rows(tokenizer, texts, timestamps=False):
    """Stored pseudo-label rows: `<|startoftranscript|><|notimestamps|> text <|endoftext|>`, or with timestamps
    `<|startoftranscript|><|0.00|> text <|1.00|><|1.00|> text <|2.00|><|endoftext|>`, and a prompt."""
    from helpers import wave

    from distil.data.audio import encode_flac

    tok = tokenizer
    sot, eot = tok.convert_tokens_to_ids("<|startoftranscript|>"), tok.eos_token_id
    t = {s: tok.convert_tokens_to_ids(f"<|{s}|>") for s in ("0.00", "1.00", "2.00")}
    rows = []
    for i, text in enumerate(texts):
        ids = tok(" " + text, add_special_tokens=False).input_ids
        if timestamps:
            half = tok(" and then some more words", add_special_tokens=False).input_ids
            token_ids = [sot, t["0.00"], *ids, t["1.00"], t["1.00"], *half, t["2.00"], eot]
        else:
            token_ids = [sot, tok.convert_tokens_to_ids("<|notimestamps|>"), *ids, eot]
        rows.append(
            {
                "audio": {"bytes": encode_flac(wave(0.5, i), 16_000), "path": None},
                "sample_id": f"s{i}",
                "source": "a/train",
                "token_ids": token_ids,
                "prompt": " what came before, unchanged",
            }
        )
    return rows


TEXTS = [
    "The lighthouse keeper painted the railings a bright shade of green.",
    "Martha planted tomatoes, beans and sunflowers behind the old barn.",
    "Twelve students finished the chemistry exam before noon.",
]


def test_bpe_dropout_keeps_the_text_and_the_special_tokens_and_p0_keeps_the_ids(tokenizer):
    from distil.data.targets import SpecialTokens
    from distil.training.augment import BPEDropout

    special = SpecialTokens.from_tokenizer(tokenizer)
    rows = label_rows(tokenizer, TEXTS, timestamps=True)
    dropout = BPEDropout(tokenizer, 0.5, special.is_text)
    changed = 0
    for row in rows:
        stored = row["token_ids"]
        dropped = dropout(stored)
        changed += dropped != stored
        # the same text, special tokens included (timestamps, prefix, end), in the same order
        assert tokenizer.decode(dropped) == tokenizer.decode(stored)
        assert [i for i in dropped if not special.is_text(i)] == [i for i in stored if not special.is_text(i)]
        assert len(dropped) >= len(stored)  # smaller pieces
    assert changed == len(rows)
    assert BPEDropout(tokenizer, 0.0, special.is_text)(rows[0]["token_ids"]) == rows[0]["token_ids"]
    # a prompt before <|startoftranscript|> is left alone (start=)
    prompt = [special.startofprev, *tokenizer(" what came before", add_special_tokens=False).input_ids]
    out = dropout(prompt + rows[0]["token_ids"], start=len(prompt))
    assert out[: len(prompt)] == prompt
    with pytest.raises(ConfigError, match=r"^augment.bpe_dropout must be a probability in \[0, 1\], got 2"):
        BPEDropout(tokenizer, 2, special.is_text)


def test_the_collator_trains_on_dropped_out_labels_and_the_teacher_scores_them(tiny_dir, tokenizer):
    from transformers import WhisperFeatureExtractor

    from distil.datamodules.collator import SpeechCollator
    from distil.training.losses import IGNORE_INDEX

    fe = WhisperFeatureExtractor.from_pretrained(tiny_dir)
    rows = label_rows(tokenizer, TEXTS)

    def collate(p, **kw):
        return SpeechCollator(fe, tokenizer, bpe_dropout=p, seed=3, **kw)(rows, epoch=0)

    plain, zero, dropped = collate(0.0), collate(0.0), collate(0.5)
    assert torch.equal(plain["labels"], zero["labels"])  # p = 0: the stored ids
    assert torch.equal(plain["decoder_input_ids"], zero["decoder_input_ids"])
    assert plain["labels"].shape[1] < dropped["labels"].shape[1]  # differ from the stored labels ...
    for stored, new in zip(plain["labels"], dropped["labels"], strict=True):
        assert tokenizer.decode(stored[stored != IGNORE_INDEX]) == tokenizer.decode(new[new != IGNORE_INDEX])
    for stored, new in zip(plain["decoder_input_ids"], dropped["decoder_input_ids"], strict=True):
        assert new[0] == stored[0]  # ... the same prefix, and the same text
    # with the prompt (always used here): the prompt's ids are the stored prompt's, masked out of the loss
    prompted = collate(0.5, condition_on_prev_probability=1.0)
    reference = collate(0.0, condition_on_prev_probability=1.0)
    n = len(tokenizer(rows[0]["prompt"], add_special_tokens=False).input_ids) + 1
    assert torch.equal(prompted["decoder_input_ids"][:, :n], reference["decoder_input_ids"][:, :n])
    # the online teacher reads the same (dropped-out) decoder inputs: a student identical to it has KL 0
    module = WhisperDistiller(tiny_dir, tiny_dir).eval()
    with torch.no_grad():
        _, parts = module.compute_loss(dropped)
    assert parts["kl"].item() == pytest.approx(0.0, abs=1e-6)


def test_a_training_run_with_bpe_dropout_trains_on_dropped_out_labels(home, tmp_path):  # noqa: F811
    import lightning as L
    from transformers import WhisperTokenizerFast

    from distil.train import run_config, train
    from distil.training.losses import IGNORE_INDEX

    labels: list[torch.Tensor] = []

    class Watch(L.Callback):
        def on_train_batch_start(self, trainer, module, rows, batch_idx):
            labels.extend(rows["labels"].cpu())

    cfg = compose_train(
        home, ["out_dir=" + str(tmp_path / "run"), "export=false", "augment.bpe_dropout=0.5"], steps=2
    )
    assert run_config(cfg)["augment.bpe_dropout"] == 0.5  # recorded in run_config.json
    train(cfg, callbacks=[Watch()])
    tok = WhisperTokenizerFast.from_pretrained(home / "models" / "whisper-tiny-random")
    eot = tok.eos_token_id
    resegmented = 0
    for row in labels:
        text_ids = [int(i) for i in row if i != IGNORE_INDEX and i < eot]
        plain = tok(tok.decode(text_ids), add_special_tokens=False).input_ids
        assert tok.decode(plain) == tok.decode(text_ids)
        resegmented += plain != text_ids
    assert len(labels) == 4 and resegmented >= 1
