"""`WhisperDistiller`: the Lightning module that trains a student Whisper against a frozen teacher.

Loss: the sum of its weighted terms (distil.training.loss_terms, listed by conf/loss/*.yaml: CE on the labels, KL
to the teacher at a temperature, hidden-state MSE, ...) over label positions only. The step computes only what
the terms need (teacher logits, hidden states) and the teacher is loaded only when a term needs it: finetune /
sft (CE only, no teacher), kd (CE + KL), kd_mse (+ hidden-state MSE).

Speed-critical choices, all exact (same loss as the straightforward computation):
- With `freeze_encoder` and a student encoder identical to the teacher's (checked once, weight by weight),
  the encoder runs ONCE per batch without gradients and both decoders read its output. Encoder MSE terms
  are then identically zero and are skipped; the decoder MSE terms still need the teacher's decoder states.
- Labels arrive padded to the longest in the batch (not 448), and the vocabulary projection runs only
  at label positions (the [B, T, 51k] logits of padding and prompt positions are never built).
- The frozen teacher runs in eval mode under `torch.no_grad`; it is a registered sub-module (Lightning moves
  it to the device) that is never checkpointed, optimised or synchronised by DDP.
- Optional on-disk encoder-output cache (distil.data.encoder_cache) for later epochs.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import lightning as L
import torch

from distil.data.encoder_cache import EncoderCache
from distil.evaluation.scoring import validation_metrics
from distil.training.augment import (
    SPECAUGMENT_WITH_CACHE,
    SpecAugment,
    apply_specaugment,
    specaugment_seed,
)
from distil.training.loss_terms import LossTerm, StepOutputs, build_terms, term_config
from distil.training.losses import IGNORE_INDEX, hidden_layer_pairs
from distil.training.optim import apply_schedule, build_optimizers
from distil.training.teacher import (
    DistillationSetupError,
    check_compatible,
    check_encoder_cache,
    resolve_freeze_encoder,
    resolve_share_encoder,
    teacher_not_missing,
    without_teacher,
)
from distil.whisper.generation import generate_texts, generation_kwargs
from distil.whisper.models import load_whisper, same_weights, weights_fingerprint
from distil.whisper.student import encoder_is_full_copy

log = logging.getLogger(__name__)

# The reference recipe's loss: 0.8 CE on the pseudo-labels + KL to the teacher at T = 2 (conf/loss/kd.yaml).
DEFAULT_TERMS = {
    "ce": {"_target_": "distil.training.loss_terms.CrossEntropy", "weight": 0.8},
    "kl": {"_target_": "distil.training.loss_terms.ForwardKL", "weight": 1.0, "temperature": 2.0},
}


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite; the message names the step and the batch's samples."""


class WhisperDistiller(L.LightningModule):
    def __init__(
        self,
        student_dir: str,
        teacher_dir: str | None = None,
        *,
        loss_terms: Mapping[str, LossTerm | Mapping[str, Any]] | None = None,
        freeze_encoder: bool | str = "auto",
        freeze_embed_positions: bool = False,
        freeze_embed_tokens: bool = False,
        share_encoder: bool | None = None,
        dropout: float | None = None,
        gradient_checkpointing: bool = False,
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        scheduler: Callable[[torch.optim.Optimizer], Any] | None = None,
        val_set_names: Sequence[str] = (),
        val_languages: Sequence[str | None] = (),
        val_max_new_tokens: int = 128,
        val_num_beams: int = 1,
        language: str | None = None,
        task: str | None = None,
        full_logits: bool = False,
        fused_optimizer: bool | None = None,
        specaugment: Mapping[str, Any] | None = None,
        seed: int = 0,
    ):
        """`loss_terms`: `{key: LossTerm or its config}` (conf/loss/*.yaml `terms`); default: 0.8 CE + KL at T = 2.
        `optimizer(params, ...)` and `scheduler(optimizer)` are partials (Hydra `_partial_: true`, see
        conf/train.yaml `module.optimizer` / `module.scheduler`); defaults: AdamW at 1e-4, constant rate.
        `specaugment`: `augment.specaugment` (distil.training.augment), applied in `training_step` with masks
        seeded by `seed` (the run's), the global step and the batch index."""
        super().__init__()
        self.specaugment = SpecAugment.from_config(specaugment)
        if self.specaugment is not None:  # a mask longer than the mel axis: refused before the models load
            from transformers import WhisperConfig

            self.specaugment.check(WhisperConfig.from_pretrained(student_dir).num_mel_bins)
        self.save_hyperparameters(ignore=["optimizer", "scheduler", "loss_terms"])
        terms = build_terms(DEFAULT_TERMS if loss_terms is None else dict(loss_terms))
        # Recorded as plain configs (checkpoints load with weights_only).
        self.hparams["loss_terms"] = {key: term_config(term) for key, term in terms.items()}
        self.optimizer_factory = optimizer or functools.partial(torch.optim.AdamW, lr=1e-4)
        self.scheduler_factory = scheduler
        self.val_set_names = list(val_set_names)
        self.val_languages = list(val_languages) or [None] * len(self.val_set_names)
        self.full_logits = full_logits
        self.encoder_cache: EncoderCache | None = None
        self.student = load_whisper(student_dir, dropout)

        needs_teacher = [key for key, term in terms.items() if term.needs_teacher]
        teacher = None
        if needs_teacher:
            if not teacher_dir:
                raise DistillationSetupError(
                    f"loss term(s) {needs_teacher} need a teacher (teacher_dir is not set)"
                )
            teacher = load_whisper(teacher_dir).eval().requires_grad_(False)
            check_compatible(self.student.config, teacher.config)
        # A registered sub-module, so Lightning moves it to the device with the student, but not persistent:
        # `state_dict` (so every checkpoint) holds the student only and loading does not ask for the teacher;
        # the optimiser sees only the student, DDP neither broadcasts nor synchronises it.
        self.teacher = teacher
        self.register_state_dict_post_hook(without_teacher)
        self.register_load_state_dict_post_hook(teacher_not_missing)
        if teacher is not None:
            self._ddp_params_and_buffers_to_ignore = [f"teacher.{k}" for k in teacher.state_dict()]

        if teacher is not None:
            identical = same_weights(self.student.model.encoder, teacher.model.encoder)
        else:  # no teacher loaded (CE-only losses): the student's own record of how it was built
            identical = encoder_is_full_copy(student_dir)
        self.freeze_encoder = resolve_freeze_encoder(freeze_encoder, identical)
        if self.freeze_encoder:
            self.student.model.encoder.requires_grad_(False)
        decoder = self.student.model.decoder
        # The reference's --freeze_embed_positions (its README's training commands); the token embeddings are
        # tied to proj_out, so freezing them freezes the output projection too and its weight gradient is not formed.
        if freeze_embed_positions:
            decoder.embed_positions.requires_grad_(False)
        if freeze_embed_tokens:
            decoder.embed_tokens.requires_grad_(False)
        share = resolve_share_encoder(share_encoder, self.freeze_encoder, identical)
        self.share_encoder = share and teacher is not None
        self.encoder_identical = identical

        self.layer_pairs: dict[str, list[tuple[int, int]]] = {}
        if teacher is not None:
            s_cfg, t_cfg = self.student.config, teacher.config
            self.layer_pairs = {
                "encoder": hidden_layer_pairs(s_cfg.encoder_layers, t_cfg.encoder_layers),
                "decoder": hidden_layer_pairs(s_cfg.decoder_layers, t_cfg.decoder_layers),
            }

        self.loss_terms = torch.nn.ModuleDict(terms)  # a term's own parameters train and checkpoint with it
        for term in terms.values():
            term.setup(self)
        if gradient_checkpointing:
            self.student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self._val_outputs: dict[int, dict[str, tuple[str, str]]] = {}
        # from_pretrained returns eval-mode models and Lightning (2.4+) keeps the mode it finds, so without this
        # the student would train without dropout (`model.dropout` would do nothing); train() keeps the frozen
        # parts in eval mode.
        self.train()

    # ------------------------------------------------------------------ set-up helpers

    def set_encoder_cache(self, cache: EncoderCache | None) -> None:
        if cache is not None:
            check_encoder_cache(self.freeze_encoder, self.teacher is not None, self.share_encoder)
            if self.specaugment is not None:  # the cache holds encoder outputs of clean inputs
                raise DistillationSetupError(SPECAUGMENT_WITH_CACHE)
        self.encoder_cache = cache

    def encoder_fingerprint(self) -> str:
        return weights_fingerprint(self.student.model.encoder)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.freeze_encoder:
            self.student.model.encoder.eval()  # frozen means deterministic too: no dropout
        if self.teacher is not None:
            self.teacher.eval()
        return self

    # ------------------------------------------------------------------ forward / loss

    def _encode(self, batch: dict[str, Any], need_hidden: bool):
        """(student encoder output, teacher encoder output, encoder hidden-state MSE term or None)."""
        dtype = next(self.student.parameters()).dtype
        if "encoder_hidden_states" in batch:  # from the cache (fp16 on disk)
            enc = batch["encoder_hidden_states"].to(self.device, dtype)
            return enc, enc, None
        feats = batch["input_features"].to(self.device, dtype)
        teacher = self.teacher
        # augment.specaugment.consistent=false: the teacher reads the clean features
        clean = batch.get("teacher_input_features")
        t_feats = feats if clean is None or teacher is None else clean.to(self.device, dtype)
        if teacher is None or self.share_encoder:
            # the shared encoder, twice: masked for the student, clean for the teacher
            if t_feats is not feats:
                with torch.no_grad():
                    enc_t = self.student.model.encoder(t_feats).last_hidden_state
                with torch.set_grad_enabled(not self.freeze_encoder and torch.is_grad_enabled()):
                    enc = self.student.model.encoder(feats).last_hidden_state
                return enc, enc_t, None
            if self.freeze_encoder:
                with torch.no_grad():
                    enc = self.student.model.encoder(feats).last_hidden_state
                if self.encoder_cache is not None:
                    self.encoder_cache.save(batch["cache_keys"], enc)
            else:
                enc = self.student.model.encoder(feats).last_hidden_state
            return enc, enc, None
        with torch.set_grad_enabled(not self.freeze_encoder and torch.is_grad_enabled()):
            s_out = self.student.model.encoder(feats, output_hidden_states=need_hidden)
        with torch.no_grad():
            t_out = teacher.model.encoder(t_feats, output_hidden_states=need_hidden)
        term = None
        if need_hidden and not self.freeze_encoder:  # a frozen student encoder gets no gradient from MSE
            term = (s_out.hidden_states, t_out.hidden_states, self.layer_pairs["encoder"], None)
        return s_out.last_hidden_state, t_out.last_hidden_state, term

    def compute_loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The weighted sum of the loss terms and each term's value (detached, for logging)."""
        terms = self.loss_terms
        labels = batch["labels"].to(self.device)
        decoder_input_ids = batch["decoder_input_ids"].to(self.device)
        need_hidden = any(t.needs_hidden_states for t in terms.values())
        need_teacher_logits = any(t.needs_teacher_logits for t in terms.values())
        enc_s, enc_t, enc_term = self._encode(batch, need_hidden)
        # Right-padded inputs under a causal mask: real positions never see padding, so no mask is needed
        # (and sdpa keeps its fast path). Padding positions are excluded from every loss term.
        s_dec = self.student.model.decoder(
            input_ids=decoder_input_ids,
            encoder_hidden_states=enc_s,
            use_cache=False,
            output_hidden_states=need_hidden,
        )
        keep = labels != IGNORE_INDEX
        if self.full_logits:  # the reference recipe's cost: logits at every position
            s_logits, sel_labels = self.student.proj_out(s_dec.last_hidden_state), labels
        else:
            s_logits, sel_labels = (
                self.student.proj_out(s_dec.last_hidden_state[keep])[None],
                labels[keep][None],
            )
        step = StepOutputs(s_logits, sel_labels, labels, enc_s, load_tokenizer=lambda: self.tokenizer)
        teacher = self.teacher
        if teacher is not None:
            with torch.no_grad():
                t_dec = teacher.model.decoder(
                    input_ids=decoder_input_ids,
                    encoder_hidden_states=enc_t,
                    use_cache=False,
                    output_hidden_states=need_hidden,
                )
                if need_teacher_logits:
                    hidden = (
                        t_dec.last_hidden_state if self.full_logits else t_dec.last_hidden_state[keep][None]
                    )
                    step.teacher_logits = teacher.proj_out(hidden)
            if need_hidden:
                mask = batch.get("decoder_attention_mask")
                mask = mask.to(self.device) if mask is not None else None
                decoder_term = (s_dec.hidden_states, t_dec.hidden_states, self.layer_pairs["decoder"], mask)
                step.hidden_terms = [t for t in (enc_term, decoder_term) if t is not None]
        total = s_logits.sum().float() * 0.0  # keeps the graph connected when every term is empty
        parts: dict[str, torch.Tensor] = {}
        for key, term in terms.items():
            value = term(step)
            total = total + term.weight * value
            parts[key] = value.detach()
        parts["loss"] = total.detach()
        return total, parts

    def augment_features(self, batch: dict[str, Any], batch_idx: int = 0) -> dict[str, Any]:
        """The batch with SpecAugment applied to its features (`augment.specaugment`; training only): one masked
        tensor that the student's and the teacher's encoders both read (`consistent=false`: the teacher reads
        the clean features, as `teacher_input_features`). Masks drawn from (seed, global step, batch index)."""
        spec = self.specaugment
        if spec is None or "input_features" not in batch:
            return batch
        index = batch.get("batch_index", batch_idx)
        seed = specaugment_seed(int(self.hparams.seed), int(self.global_step), int(index))
        masked = apply_specaugment(batch["input_features"], spec, seed)
        out = {**batch, "input_features": masked}
        if not spec.consistent:
            out["teacher_input_features"] = batch["input_features"]
        return out

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        batch = self.augment_features(batch, batch_idx)
        loss, parts = self.compute_loss(batch)
        finite = torch.isfinite(loss.detach())
        if self.trainer is not None and self.trainer.world_size > 1:  # every rank stops together
            finite = self.trainer.strategy.reduce(finite.float(), reduce_op="min") > 0
        if not bool(finite):
            raise NonFiniteLossError(
                f"non-finite training loss ({loss.item()}) at global step {self.global_step} (data epoch "
                f"{batch.get('epoch')}, batch {batch.get('batch_index')}); samples: {batch.get('sample_ids')}. "
                "Training stopped; the last checkpoint written before this step is intact. Lower optim.lr, "
                "check these samples' labels, or use precision 32 to investigate."
            )
        bs = batch["labels"].shape[0]
        for name, value in parts.items():
            self.log(f"train/{name}", value, prog_bar=name == "loss", batch_size=bs)
        self.log(
            "train/tokens", (batch["labels"] != IGNORE_INDEX).sum().float(), reduce_fx="sum", batch_size=bs
        )
        if "epoch" in batch:
            self.log("train/data_epoch", float(batch["epoch"]), batch_size=bs)
        self.log("train/cached_encoder", float("encoder_hidden_states" in batch), batch_size=bs)
        return loss

    # ------------------------------------------------------------------ validation

    def _generate_kwargs(self, language: str | None) -> dict:
        return generation_kwargs(
            self.student,
            language or self.hparams.language,
            self.hparams.task,
            self.hparams.val_max_new_tokens,
            self.hparams.val_num_beams,
        )

    def validation_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        languages = self.val_languages
        language = languages[dataloader_idx] if dataloader_idx < len(languages) else None
        kwargs = self._generate_kwargs(language)
        texts = generate_texts(self.student, self.tokenizer, batch["input_features"], kwargs)
        out = self._val_outputs.setdefault(dataloader_idx, {})
        for key, ref, hyp in zip(batch["sample_ids"], batch["references"], texts, strict=True):
            out[key] = (ref, hyp)

    @property
    def tokenizer(self):
        if getattr(self, "_tokenizer", None) is None:
            from transformers import WhisperTokenizerFast

            self._tokenizer = WhisperTokenizerFast.from_pretrained(self.hparams.student_dir)
        return self._tokenizer

    def on_validation_epoch_start(self) -> None:
        self._val_outputs = {}

    def on_validation_epoch_end(self) -> None:
        outputs = self._val_outputs
        # Under DDP each rank decoded its share (Lightning's DistributedSampler, which pads the last share by
        # repeating samples): the WER is computed from every rank's transcripts, keyed by sample id so a
        # repeat counts once, and every rank logs the same values (so ModelCheckpoint agrees on all ranks).
        if self.trainer.world_size > 1:
            gathered: list = [None] * self.trainer.world_size
            torch.distributed.all_gather_object(gathered, outputs)
            outputs = {}
            for part in gathered:
                for idx, rows in part.items():
                    outputs.setdefault(idx, {}).update(rows)
        metrics = validation_metrics(outputs, self.val_set_names, self.val_languages)
        for key, value in metrics.items():  # already over all ranks: nothing left for sync_dist to reduce
            self.log(key, float(value), sync_dist=False, rank_zero_only=False)
        self._val_outputs = {}

    # ------------------------------------------------------------------ optimisation and checkpoints

    def _use_fused(self) -> bool:
        """Fused AdamW (one pass over each tensor: several times faster for the 51k x d embedding), except
        with fp16 loss scaling, where Lightning must unscale gradients before clipping them."""
        fused = self.hparams.fused_optimizer
        precision = str(self.trainer.precision) if self._trainer is not None else "32-true"
        if fused is None:
            fused = not precision.startswith("16")
        return bool(fused)

    def configure_optimizers(self):
        # A loss term may have parameters of its own: they train with the student.
        trained = torch.nn.ModuleList([self.student, self.loss_terms])
        return build_optimizers(self.optimizer_factory, self.scheduler_factory, trained, self._use_fused())

    def configure_gradient_clipping(
        self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None
    ) -> None:
        # Lightning refuses to clip for fused optimizers under mixed precision (they may unscale internally);
        # without a grad scaler (fp32, bf16) the gradients are already unscaled, so clip them here.
        if not gradient_clip_val:
            return
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        if scaler is None and gradient_clip_algorithm in (None, "norm"):
            params = [p for group in optimizer.param_groups for p in group["params"]]
            torch.nn.utils.clip_grad_norm_(params, float(gradient_clip_val))
        else:
            self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def on_train_start(self) -> None:
        # The rates of a resumed run are its own config's formula at the restored step (Lightning restores the
        # rates the checkpointed run last computed; e.g. another trainer.max_steps would apply one step late).
        for config in self.trainer.lr_scheduler_configs:
            apply_schedule(config.scheduler.optimizer, config.scheduler)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["distil_rng"] = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            checkpoint["distil_rng"]["cuda"] = torch.cuda.get_rng_state_all()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        missing = sorted(
            k for k in self.state_dict() if k.startswith("student.") and k not in checkpoint["state_dict"]
        )
        if missing:
            raise DistillationSetupError(
                f"the checkpoint does not fit this student: {len(missing)} student weights missing, e.g. {missing[:3]}"
            )
        rng = checkpoint.get("distil_rng")
        if rng is not None:  # exact resume with dropout
            torch.set_rng_state(rng["torch"])
            if "cuda" in rng and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(rng["cuda"])
