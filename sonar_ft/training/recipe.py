"""The fine-tuning recipe, read top to bottom: set up, then epochs of steps, then validation and checkpoints.

    recipe = FineTuneRecipe(cfg, ddp)
    recipe.setup()          # output folder, data, encoder + frozen decoder, optimiser, run records, resume
    result = recipe.train() # epochs: train_epoch (windows of micro-batches -> one step) -> validate -> end_epoch

Only the encoder learns. Gradient accumulation is exact: the ``grad_accum`` micro-batches of a
window (the window at the end of an epoch may be shorter) are weighted by their share of the
window's target tokens, counted over all ranks with one reduction, so the step's gradient is that
of one batch holding all of them. Under torchrun, non-final micro-steps skip DDP's synchronisation.

The places other features hook into are small named methods: :meth:`claim_output_dir`,
:meth:`build_encoder`, :meth:`trainable_parameters`, :meth:`encoder_state_for_last`,
:meth:`save_best_encoder` and :meth:`save_last`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import resource
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from sonar_ft.config import TrainConfig, maximize
from sonar_ft.data.bad_samples import BadSample
from sonar_ft.data.dataset import make_loader
from sonar_ft.data.splits import check_feature_dim, load_split
from sonar_ft.device import decoder_dtype, resolve_device, resolve_precision
from sonar_ft.errors import ConfigError, DataError, OutputDirError
from sonar_ft.evaluate import EvalResult, autocast_context, embedding_gatherer, empty_epoch_fields, evaluate, load_scorer
from sonar_ft.files import atomic
from sonar_ft.files.guards import check_output_dir, recipe_inputs
from sonar_ft.files.lock import output_lock
from sonar_ft.models.decoder import FrozenTextDecoder
from sonar_ft.models.encoder import load_encoder, save_encoder
from sonar_ft.plan.recommend import longest_target, startup_check
from sonar_ft.run_files import ADAPTER_DIR, BAD_SAMPLES, BEST_ENCODER, metrics_file, predictions_file
from sonar_ft.training import distributed, perf
from sonar_ft.training.failures import (
    count_bad_step, out_of_memory_error, refuse_broken_weights, screen_bad_samples,
)
from sonar_ft.training.logs import Progress, StepRecorder, attach_train_log, epoch_line, progress_mode
from sonar_ft.training import records
from sonar_ft.training.run_dir import (
    check_inputs, clear_run_files, finished_run, last_state_path, prepare_output_dir, write_run_summary,
)
from sonar_ft.training.state import EpochMetrics, TrainResult, TrainState, seed_everything, set_rng_state
from sonar_ft.training.state_mirror import best_copy_is_torn, mirror_best, mirror_state

log = logging.getLogger(__name__)


@dataclass
class EpochSums:
    """A rank's running totals over one epoch (summed over ranks at its end)."""

    loss_sum: float = 0.0  # token loss summed over target tokens
    token_sum: int = 0
    seen: int = 0  # clips


class FineTuneRecipe:
    """One fine-tuning run of the SONAR ASL encoder against the frozen SONAR text decoder."""

    def __init__(
        self, cfg: TrainConfig, ddp: distributed.DistContext, *,
        on_evaluation: Callable[[EpochMetrics], None] | None = None, reuse_data: dict[tuple, Any] | None = None,
    ) -> None:
        self.cfg = cfg
        self.ddp = ddp
        self.on_evaluation = on_evaluation
        self.reuse_data = reuse_data
        self.state = TrainState()
        self.checkpointing = cfg.save_checkpoints  # the same on every rank (mid-epoch saves take all ranks part)
        self.stopped_early = False
        self.bad_steps = 0

    # =============================================================================================
    # Setup
    # =============================================================================================
    def setup(self) -> None:
        """Everything before the first step; nothing in the output folder is deleted before it all worked."""
        cfg, ddp = self.cfg, self.ddp
        self.device = ddp.device if ddp.active else resolve_device(cfg.device)
        self.precision = resolve_precision(cfg.precision, self.device)
        check_inputs(cfg)
        self.out, self.resuming, self.clear_previous = ddp.on_main(self.claim_output_dir)
        seed_everything(cfg.seed)
        if not ddp.is_main:
            # Rank 0 writes every file; the others differ in dropout noise only.
            self.cfg = cfg = replace(cfg, save_checkpoints=False, write_predictions=False)
            torch.manual_seed(cfg.seed + ddp.rank)
        self.decoder = self.build_decoder()  # before the data: its tokenizer checks every reference in the bad-clip scan
        self.load_data()
        self.build_models()
        self.build_optimizer()
        if self.clear_previous:
            ddp.on_main(lambda: clear_run_files(self.out, last_state_path(cfg)))
        if ddp.is_main:
            self.write_run_records()
        if self.resuming:
            self.load_last()
        main = self.out if ddp.is_main else None
        self.recorder = StepRecorder(main, every=cfg.log_every_steps, reporters=cfg.reporters(), distill_weight=cfg.distill_weight,
                                     resumed_step=self.state.step if self.resuming else None)
        self.progress = Progress(self.progress_kind, epochs=cfg.epochs, every_seconds=cfg.progress_seconds)

    @property
    def progress_kind(self) -> str:
        return progress_mode(self.cfg.progress) if self.ddp.is_main else "none"

    def claim_output_dir(self) -> tuple[Path, bool, bool]:
        """The output folder (created), whether this run resumes the one in it, and whether another run's
        files must be removed once this one is known to start (``--overwrite``). The place for a folder lock."""
        out, resuming = prepare_output_dir(self.cfg)
        return out, resuming, self.cfg.overwrite and not resuming

    def load_data(self) -> None:
        cfg, ddp = self.cfg, self.ddp
        bad: list[BadSample] = []  # every unusable clip of both splits, reported together
        references = {"count_tokens": lambda texts: self.decoder.count_tokens(texts, cfg.tgt_lang),
                      "max_tokens": self.decoder.max_target_len}
        self.train_set = load_split(cfg.train_features, cfg.train_manifest, cfg=cfg, split="training",
                                    fraction=cfg.subset_fraction, bad=bad, reuse=self.reuse_data, **references)
        self.val_set = load_split(cfg.val_features, cfg.val_manifest, cfg=cfg, split="validation", bad=bad,
                                  reuse=self.reuse_data, **references)
        ddp.on_main(lambda: screen_bad_samples(self.out, cfg, bad))
        for split, dataset, manifest in (("training", self.train_set, cfg.train_manifest), ("validation", self.val_set, cfg.val_manifest)):
            if len(dataset) == 0:
                raise DataError(f"the {split} manifest {manifest} has no usable clips"
                                + (f" (all listed in {self.out / BAD_SAMPLES})" if bad else ""))
        if cfg.batch_size > len(self.train_set):
            log.warning("--batch_size %d is larger than the %d training clips: every batch holds all of them", cfg.batch_size, len(self.train_set))
        # Each step's clips are chosen at the effective batch, then split into micro-batches: the split may change on resume.
        self.train_batches = make_loader(self.train_set, cfg.batch_size, shuffle=True, seed=cfg.seed, grad_accum=cfg.grad_accum,
                                         num_workers=cfg.num_workers, num_replicas=ddp.world_size, rank=ddp.rank)
        self.val_batches = make_loader(ddp.shard(self.val_set), cfg.batch_size, shuffle=False, seed=cfg.seed,
                                                   num_workers=cfg.num_workers)

    def build_decoder(self) -> FrozenTextDecoder:
        """The frozen decoder, with its tokenizer checked against ``--tgt_lang``."""
        cfg = self.cfg
        decoder = FrozenTextDecoder.load(cfg.decoder, cfg.tokenizer, device=self.device,
                                         dtype=decoder_dtype(cfg.decoder_dtype, self.device))
        if cfg.gradient_checkpointing:
            perf.checkpoint_decoder_layers(decoder.model)
        decoder.check_lang(cfg.tgt_lang)
        return decoder

    def build_models(self) -> None:
        """The trainable encoder (matched against the decoder and the data) and the optional distillation teacher."""
        cfg = self.cfg
        self.encoder, self.arch = self.build_encoder()
        if self.arch.output_dim != self.decoder.embedding_dim:
            raise ConfigError(
                f"the encoder {cfg.encoder_checkpoint} outputs {self.arch.output_dim}-d embeddings but the decoder {cfg.decoder} "
                f"reads {self.decoder.embedding_dim}-d ones: they do not belong together"
            )
        for features, dataset in ((cfg.train_features, self.train_set), (cfg.val_features, self.val_set)):
            check_feature_dim(dataset, self.arch.feature_dim, features=features, encoder=cfg.encoder_checkpoint)
        self.teacher = None
        if cfg.distill_weight > 0:
            from sonar_ft.models.text_encoder import FrozenTextEncoder

            self.teacher = FrozenTextEncoder.load(cfg.text_encoder or "text_sonar_basic_encoder", cfg.tokenizer, device=self.device)
        # Semantic scores only with a text encoder that is given (or loaded for distillation anyway): never a silent download.
        self.scorer = self.teacher if self.teacher is not None else load_scorer(cfg, self.device)
        self.model = self.ddp.wrap(self.encoder)  # DDP under torchrun; `encoder` stays the module saved and evaluated

    def build_encoder(self) -> tuple[torch.nn.Module, Any]:
        """The encoder to train and its architecture (the place where LoRA wraps it)."""
        encoder, arch = load_encoder(self.cfg.encoder_checkpoint, dropout=self.cfg.dropout, device=self.device)
        perf.configure_encoder(encoder, self.cfg)  # --freeze_encoder_layers, --gradient_checkpointing, --compile
        self.peft_model = None
        if self.cfg.lora_rank:  # adapters injected into `encoder` itself; its base weights frozen
            from sonar_ft.models import lora

            self.peft_model = lora.apply_lora(encoder, self.cfg)[0]
        return encoder, arch

    def trainable_parameters(self) -> list[dict[str, Any]]:
        """The optimiser's parameter groups: decay on weight matrices only (the place LoRA narrows)."""
        return perf.parameter_groups(self.encoder, self.cfg.weight_decay)

    def build_optimizer(self) -> None:
        cfg = self.cfg
        groups = self.trainable_parameters()
        self.params = [p for g in groups for p in g["params"]]
        self.optimizer = perf.build_optimizer(groups, cfg.optimizer, lr=cfg.learning_rate, weight_decay=cfg.weight_decay, device=self.device)
        self.scaler = perf.grad_scaler(cfg.decoder_dtype, self.device)  # loss scaling through an fp16 decoder; else a no-op
        self.maximize = maximize(cfg.select_metric)
        self.plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(
            self.optimizer, mode="max" if self.maximize else "min", factor=cfg.plateau_factor, patience=cfg.plateau_patience
        )

    def write_run_records(self) -> None:
        cfg = self.cfg
        records.write_run_records(self.out, cfg, asdict(self.arch), self.decoder, self.device, self.precision,
                                  world_size=self.ddp.world_size)
        startup_check(cfg, self.arch, frames=max(self.train_set.lengths), device=self.device, precision=self.precision,
                      target_tokens=longest_target(self.decoder, [r.text for r in self.train_set.rows], cfg.tgt_lang))

    def load_last(self) -> None:
        """Continue from ``last.pt``; the loaded file is released before training goes on.

        The file is memory-mapped: its tensors are copied straight into the encoder and (on a GPU)
        into the optimiser's state on the device, so host RAM never holds the whole 9 GB file at once.
        """
        path = last_state_path(self.cfg)
        state = atomic.load_torch(path, what="training state", mmap=True)
        if self.peft_model is not None:  # LoRA: last.pt holds only the trainable tensors
            from sonar_ft.models import lora

            lora.load_trainable_state_dict(self.encoder, state.pop("encoder"), source=str(path))
        else:
            self.encoder.load_state_dict(state.pop("encoder"))
        try:
            self.optimizer.load_state_dict(state.pop("optimizer"))
        except ValueError as exc:  # e.g. a last.pt written by an older sonar-ft with other parameter groups
            raise OutputDirError(
                f"{path} holds an optimiser state this version cannot continue ({exc}); "
                f"start a new run (another --output_dir, or --overwrite), or fine-tune from its best_encoder.pt"
            ) from None
        scaler = state.pop("scaler", None)
        if scaler:
            self.scaler.load_state_dict(scaler)
        self.plateau.load_state_dict(state.pop("plateau"))
        self.state.load_state_dict(state)
        del state, scaler  # nothing of the loaded file stays referenced (9 GB at the official size)
        set_rng_state(self.state.rng)
        if self.state.position is None:
            self.state.rng = None
        else:
            log.info("resuming inside epoch %d after step %d of it", self.state.position["epoch"], position_windows(self.state.position, self.cfg))
        best = self.state.best
        if self.cfg.state_dir and best["epoch"] is not None and best_copy_is_torn(self.out):
            log.warning("%s was being copied when the runtime stopped and is incomplete: the best encoder so far (epoch %s) "
                        "is lost; the next improvement writes it again", self.out / BEST_ENCODER, best["epoch"])
        log.info("resuming from epoch %d (step %d, best %s at epoch %s)", self.state.epoch, self.state.step, best["score"], best["epoch"])

    # =============================================================================================
    # Training
    # =============================================================================================
    def train(self) -> TrainResult:
        """Epochs of steps; after each, validation (every ``eval_every``), records and checkpoints."""
        cfg, st = self.cfg, self.state
        log.info("training %d clips, validating on %d | device %s, %s | encoder %s | effective batch %d",
                 len(self.train_set), len(self.val_set), self.device, self.precision, cfg.encoder_checkpoint,
                 cfg.batch_size * cfg.grad_accum * self.ddp.world_size)
        self.progress.start(st.epoch + 1)
        try:
            for epoch in range(st.epoch + 1, cfg.epochs + 1):
                started = time.perf_counter()
                sums, train_seconds = self.train_epoch(epoch)
                result = self.validate(epoch) if epoch % cfg.eval_every == 0 or epoch == cfg.epochs else None
                metrics = EpochMetrics(
                    epoch=epoch, train_loss=sums.loss_sum / max(sums.token_sum, 1),
                    **(result.epoch_fields() if result else empty_epoch_fields()), lr=self.optimizer.param_groups[0]["lr"],
                    seconds=time.perf_counter() - started + self._resumed_seconds, samples_per_second=sums.seen / max(train_seconds, 1e-9),
                )
                self.end_epoch(metrics, result)
                if self.stopped_early:
                    break
        finally:
            self.progress.close()
            self.recorder.close()
        if self.ddp.is_main:
            write_run_summary(self.out, cfg, st, self.stopped_early)
        return self.result()

    _resumed_seconds = 0.0

    def train_epoch(self, epoch: int) -> tuple[EpochSums, float]:
        """One pass over the training batches, one optimiser step per window; the epoch's sums over all ranks."""
        cfg, st = self.cfg, self.state
        started = time.perf_counter()
        self.encoder.train()
        sums, done, restore_rng = EpochSums(), 0, None  # done: windows (optimiser steps) of this epoch
        self._resumed_seconds = 0.0
        if st.position is not None and st.position["epoch"] == epoch:
            done = position_windows(st.position, cfg)
            if self.ddp.is_main:  # the partial sums were saved summed over all ranks: counted once, on rank 0
                sums = EpochSums(st.position["loss_sum"], int(st.position["token_sum"]), int(st.position["seen"]))
            self._resumed_seconds = st.position["seconds"]
            started -= st.position["seconds"]
            restore_rng, st.position, st.rng = st.rng, None, None
        sampler = self.train_batches.batch_sampler
        sampler.set_epoch(epoch, skip=done)
        sizes = sampler.window_sizes()  # micro-batches per window: the progress counts micro-batches
        self.optimizer.zero_grad(set_to_none=True)
        self.progress.epoch_start(epoch, sum(sizes), sum(sizes[:done]))
        self._last_save = self.clock()
        for window in self._windows(iter(self.train_batches), sizes[done:]):
            if restore_rng is not None:
                # Starting the DataLoader drew from the global RNG; dropout must go on from the
                # state of the moment last.pt was written, as it would have without the stop.
                set_rng_state(restore_rng)
                restore_rng = None
            done += 1
            stepped = self.train_step(window, sums, epoch, done)
            if stepped and self.checkpointing and self.mid_epoch_save_due():
                # The epoch's partial sums over all ranks (every rank takes part), written by rank 0.
                partial = self.ddp.sum(sums.loss_sum, sums.token_sum, sums.seen)
                self.save_last(position={"epoch": epoch, "windows": done, "loss_sum": partial[0],
                                         "token_sum": partial[1], "seen": partial[2], "seconds": time.perf_counter() - started})
                self._last_save = self.clock()
        if restore_rng is not None:  # resumed at the very end of the epoch: no batch was left to restore it
            set_rng_state(restore_rng)
        train_seconds = time.perf_counter() - started
        loss_sum, token_sum, seen = self.ddp.sum(sums.loss_sum, sums.token_sum, sums.seen)  # over all ranks
        return EpochSums(loss_sum, int(token_sum), int(seen)), train_seconds

    def mid_epoch_save_due(self) -> bool:
        """Whether ``last.pt`` is written after this step: every ``checkpoint_every_steps`` steps, or once
        ``checkpoint_every_minutes`` have passed since the last save (or the epoch's start).

        The time is rank 0's clock, shared with one reduction, so every rank decides the same (a
        mid-epoch save takes all ranks part). Saving changes no result: a run resumed from any save
        continues exactly as the uninterrupted one.
        """
        cfg = self.cfg
        due = bool(cfg.checkpoint_every_steps) and self.state.step % cfg.checkpoint_every_steps == 0
        if cfg.checkpoint_every_minutes:
            elapsed = self.clock() - self._last_save if self.ddp.is_main else 0.0
            if self.ddp.active:
                elapsed = self.ddp.sum(elapsed)[0]
            due = due or elapsed >= 60.0 * cfg.checkpoint_every_minutes
        return due

    clock: Callable[[], float] = staticmethod(time.monotonic)
    """Seconds for ``checkpoint_every_minutes`` (injectable: tests step it deterministically)."""
    _last_save = 0.0

    @staticmethod
    def _windows(batches: Iterator[Any], sizes: list[int]) -> Iterator[list[Any]]:
        """The micro-batches of ``batches`` grouped into windows of ``sizes`` micro-batches (one optimiser step each)."""
        for size in sizes:
            window = [next(batches) for _ in range(size)]
            yield window

    def train_step(self, window: list[Any], sums: EpochSums, epoch: int, done: int) -> bool:
        """Forward and backward every micro-batch of ``window``, then one optimiser step; True if it was taken.

        Each micro-batch's summed token loss is divided by the window's target tokens over all
        ranks (its summed distillation distance by the window's clips), times the world size
        because DDP averages over ranks: the step's gradient is that of one batch of every clip
        of the window on every rank.
        """
        cfg, ddp = self.cfg, self.ddp
        tokens = [int(self.decoder.scored_tokens(b.texts, cfg.tgt_lang).sum()) for b in window]
        clips = [len(b) for b in window]
        total_tokens, total_clips = ddp.sum(float(sum(tokens)), float(sum(clips)))  # the one reduction of the window
        local = {"ce_sum": 0.0, "tokens": 0, "distill_sum": 0.0, "clips": 0}
        bad_loss_at: str | None = None  # where the first non-finite loss of the window was
        for i, batch in enumerate(window):
            final = i == len(window) - 1
            batch = batch.to(self.device)
            try:
                with contextlib.nullcontext() if final else ddp.no_sync(self.model):
                    with autocast_context(self.device, self.precision):
                        emb = self.model(batch.features, batch.mask)  # (B, E)
                    emb = emb.float()
                    out = self.decoder.loss(emb, batch.texts, cfg.tgt_lang, label_smoothing=cfg.label_smoothing,
                                            chunk_size=cfg.loss_chunk_size)
                    if out.num_tokens != tokens[i]:
                        raise RuntimeError(f"counted {tokens[i]} target tokens but the loss scored {out.num_tokens}")
                    loss = out.loss * (out.num_tokens / max(total_tokens, 1.0))
                    distill = None
                    if self.teacher is not None:
                        from sonar_ft.models.text_encoder import distillation_loss

                        distill = distillation_loss(emb, self.teacher.embed(batch.texts, cfg.tgt_lang), cfg.distill_loss)
                        loss = loss + cfg.distill_weight * distill * (len(batch) / max(total_clips, 1.0))
                    # A non-finite loss still goes through backward (its NaN gradient makes every rank skip the step
                    # together); skipping backward on one rank would leave the others waiting forever.
                    self.scaler.scale(loss * ddp.world_size).backward()
            except torch.cuda.OutOfMemoryError:
                raise out_of_memory_error(cfg) from None
            ce = float(out.loss.detach())
            if math.isfinite(ce) and (distill is None or math.isfinite(float(distill.detach()))):
                sums.loss_sum += ce * out.num_tokens
                sums.token_sum += out.num_tokens
                local["ce_sum"] += ce * out.num_tokens
                local["tokens"] += out.num_tokens
                if distill is not None:
                    local["distill_sum"] += float(distill.detach()) * len(batch)
                local["clips"] += len(batch)
            elif bad_loss_at is None:
                bad_loss_at = f"epoch {epoch}, step {done} of the epoch, micro-batch {i + 1} ({batch.ids[0]}, ...)"
            sums.seen += len(batch)
        stepped, norm = self.optimizer_step()
        if stepped:
            self.bad_steps = 0
        else:
            what, where = ("loss", bad_loss_at) if bad_loss_at else ("gradient", f"epoch {epoch}, step {done} of the epoch")
            self.bad_steps = count_bad_step(self.bad_steps, self.out, cfg, what, where)
        self.record_step(epoch, window, local, norm, stepped)
        return stepped

    def optimizer_step(self) -> tuple[bool, float | None]:
        """One clipped AdamW step: ``(True, grad norm)``, or ``(False, norm)`` when the gradient is NaN/Inf (skipped).

        With loss scaling on (fp16 decoder), gradients are unscaled first and an overflowing step lowers
        the scale; with it off, the scaler does nothing.
        """
        cfg, st, optimizer = self.cfg, self.state, self.optimizer
        if cfg.warmup_steps and st.step < cfg.warmup_steps:
            for group in optimizer.param_groups:
                group["lr"] = cfg.learning_rate * (st.step + 1) / cfg.warmup_steps
        self.scaler.unscale_(optimizer)
        # With clipping off, max_norm=inf only measures the norm, so a NaN/Inf gradient is still caught.
        norm = torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
        if not bool(torch.isfinite(norm)):
            optimizer.zero_grad(set_to_none=True)
            if self.scaler.is_enabled():
                scale = self.scaler.get_scale()
                self.scaler.update()  # found_inf was recorded by unscale_: the scale is lowered
                log.info("gradient overflow at loss scale %g: step skipped, scale now %g", scale, self.scaler.get_scale())
            return False, None
        try:
            optimizer.step()  # the first step allocates AdamW's two moments: a common place to run out of memory
        except torch.cuda.OutOfMemoryError:
            raise out_of_memory_error(cfg) from None
        self.scaler.update()
        optimizer.zero_grad(set_to_none=True)
        st.step += 1
        return True, float(norm)

    def record_step(self, epoch: int, window: list[Any], local: dict[str, float], norm: float | None, stepped: bool) -> None:
        """Progress display, and every ``log_every_steps`` steps a step record (sums over all ranks)."""
        rec = self.recorder
        rec.add(local["ce_sum"], local["tokens"], local["distill_sum"], local["clips"], norm)
        lr = self.optimizer.param_groups[0]["lr"]
        step = self.state.step
        if stepped and self.cfg.log_every_steps and step % self.cfg.log_every_steps == 0:
            ce_sum, tok, d_sum, clips = self.ddp.sum(*rec.take_local())  # every rank takes part
            rec.write(step=step, epoch=epoch, lr=lr, ce_sum=ce_sum, tokens=int(tok), distill_sum=d_sum, clips=int(clips),
                      peak_memory_gib=peak_memory_gib(self.device))
        loss = local["ce_sum"] / max(local["tokens"], 1)
        self.progress.update(len(window), sum(len(b) for b in window), step=step, loss=loss, lr=lr)

    # =============================================================================================
    # Validation and checkpoints
    # =============================================================================================
    def validate(self, epoch: int) -> EvalResult:
        """Loss, BLEU, chrF (and what ``evaluate`` adds) on the validation split, every rank its share."""
        cfg = self.cfg
        try:
            return evaluate(
                self.encoder, self.decoder, self.val_batches, lang=cfg.tgt_lang, device=self.device, precision=self.precision,
                beam_size=cfg.beam_size, max_gen_len=cfg.max_gen_len, loss_chunk_size=cfg.loss_chunk_size,
                desc=f"validating epoch {epoch}", gather=self.ddp.eval_gatherer(self.val_set), text_encoder=self.scorer,
                gather_embeddings=embedding_gatherer(self.ddp.gather) if self.ddp.active else None,
            )
        except torch.cuda.OutOfMemoryError:
            raise out_of_memory_error(cfg) from None

    def score(self, result: EvalResult) -> float:
        """``select_metric`` of ``result``."""
        summary = result.summary()
        value = summary.get(self.cfg.select_metric)
        if value is None:
            raise ConfigError(f"--select_metric {self.cfg.select_metric}: the evaluation does not compute it in this version; "
                              f"use one of {', '.join(k for k, v in summary.items() if isinstance(v, (int, float)))}")
        return float(value)

    def improves(self, result: EvalResult, score: float) -> bool:
        best = self.state.best
        if best["score"] is None:
            return True
        if score == best["score"] or abs(score - best["score"]) <= 1e-9:
            # Ties (common early on, at BLEU 0) are broken by the validation loss.
            return (result.loss or math.inf) < (best["loss"] if best["loss"] is not None else math.inf)
        return score > best["score"] if self.maximize else score < best["score"]

    def end_epoch(self, metrics: EpochMetrics, result: EvalResult | None) -> None:
        """Best checkpoint, plateau, predictions, the epoch's records and ``last.pt``; early stopping."""
        cfg, st = self.cfg, self.state
        if result is not None:
            score = self.score(result)
            if st.step >= cfg.warmup_steps:
                self.plateau.step(score)
            if self.improves(result, score):
                st.best = {"score": score, "epoch": metrics.epoch, "bleu": result.bleu, "loss": result.loss}
                metrics.is_best = True
                st.evals_without_improvement = 0
                self.save_best_encoder(metrics.epoch, result)
            else:
                st.evals_without_improvement += 1
            if cfg.write_predictions:
                atomic.write_json(self.out / predictions_file(metrics.epoch), result.predictions_record(metrics.epoch))
        st.history.append(metrics)
        st.epoch = metrics.epoch
        if self.ddp.is_main:
            atomic.write_json(self.out / metrics_file(metrics.epoch), asdict(metrics))
        self.recorder.record_epoch(asdict(metrics), st.step)
        self.save_last()
        self.progress.epoch_end(epoch_line(metrics, cfg.epochs))
        if result is not None and self.on_evaluation is not None:
            self.on_evaluation(metrics)
        if result is not None and cfg.early_stopping_patience and st.evals_without_improvement >= cfg.early_stopping_patience:
            log.info("early stopping: no improvement in %d evaluations", st.evals_without_improvement)
            self.stopped_early = True

    def save_best_encoder(self, epoch: int, result: EvalResult) -> None:
        """``best_encoder.pt`` in the official layout (the place LoRA writes the merged encoder)."""
        if not self.cfg.save_checkpoints:
            return
        # With --state_dir it is written locally, then copied onto the run folder's in place (no Drive trash).
        path = Path(self.cfg.state_dir) / BEST_ENCODER if self.cfg.state_dir else self.out / BEST_ENCODER
        refuse_broken_weights(self.encoder, path, f"epoch {epoch}")
        extra = {"epoch": epoch, "val_bleu": result.bleu, "val_loss": result.loss}
        if self.peft_model is None:
            save_encoder(self.encoder, path, extra=extra)
        else:
            from sonar_ft.models import lora  # the merged encoder in the official layout, and the adapter alone in peft's format

            save_encoder(self.encoder, path, extra=extra, state_dict=lora.merged_state_dict(self.encoder))
            lora.save_adapter(self.peft_model, self.out / ADAPTER_DIR)
        if self.cfg.state_dir:
            mirror_best(path, self.out)

    def encoder_state_for_last(self) -> dict[str, torch.Tensor]:
        """The encoder tensors ``last.pt`` keeps (LoRA: the trainable ones only)."""
        if self.peft_model is None:
            return self.encoder.state_dict()
        from sonar_ft.models import lora

        return lora.trainable_state_dict(self.encoder)

    def save_last(self, position: dict[str, Any] | None = None) -> None:
        """Write the resumable ``last.pt``; ``position`` is the place inside the next epoch of a mid-epoch save.

        Broken (NaN/Inf) weights are never written: ``last.pt`` keeps the last good state.
        """
        if not self.cfg.save_checkpoints:
            return
        st = self.state
        path = last_state_path(self.cfg)
        refuse_broken_weights(self.encoder, path, f"epoch {st.epoch + 1 if position else st.epoch}, step {st.step}")
        saved = replace(st, position=position)
        atomic.save_torch(path, {
            "encoder": self.encoder_state_for_last(), "optimizer": self.optimizer.state_dict(), "plateau": self.plateau.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None, **saved.state_dict(),
        })
        if self.cfg.state_dir:  # its copy in the run folder: a slot file overwritten in place
            mirror_state(path, self.out, slots=self.cfg.state_slots, step=st.step)

    def result(self) -> TrainResult:
        best = self.state.best
        return TrainResult(
            best_epoch=best["epoch"], best_score=best["score"], best_val_bleu=best["bleu"], best_val_loss=best["loss"],
            history=list(self.state.history), stopped_early=self.stopped_early, output_dir=str(self.out),
        )


def position_windows(position: dict[str, Any], cfg: TrainConfig) -> int:
    """Windows (optimiser steps) of its epoch a mid-epoch ``last.pt`` had consumed.

    Files written before positions counted windows hold ``batches`` (micro-batches, always a whole
    number of windows there).
    """
    if "windows" in position:
        return int(position["windows"])
    return int(position["batches"]) // cfg.grad_accum


def peak_memory_gib(device: torch.device) -> float:
    """Peak GPU memory allocated (CUDA), else the process's peak resident memory, in GiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return kib / (2**30 if sys.platform == "darwin" else 2**20)


def fine_tune(
    cfg: TrainConfig, *, on_evaluation: Callable[[EpochMetrics], None] | None = None, reuse_data: dict[tuple, Any] | None = None,
) -> TrainResult:
    """Fine-tune the encoder as configured; ``on_evaluation`` is called after each evaluation (tuning prunes there).

    ``reuse_data``: a dict kept between runs of one process (tuning trials), so that a later run with
    the same data settings reuses the earlier datasets, their bad-clip scan and feature cache
    (see :func:`sonar_ft.data.splits.load_split`).

    Under ``torchrun`` (``WORLD_SIZE`` > 1) every process runs this data-parallel: ``--batch_size``
    is per process, only rank 0 writes files. A run whose output folder already holds it, finished,
    returns at once (``already_finished``) without reading a clip or loading a model.
    """
    from sonar_ft.training.recipe import FineTuneRecipe

    cfg.validate()
    done = finished_run(cfg)
    if done is not None:
        best = f", best epoch {done.best_epoch}" if done.best_epoch is not None else ""
        log.info("%s already holds this run, finished (%d epochs%s): nothing to do. Raise --epochs to continue it, "
                 "or pass --overwrite to train it again.", cfg.output_dir, cfg.epochs, best)
        return done
    check_output_dir(cfg.output_dir, recipe_inputs(cfg))  # never a run folder that is, or holds, one of its inputs
    ddp = distributed.setup(cfg.device)
    main_out = Path(cfg.output_dir) if ddp.is_main else None
    if main_out is not None:
        try:
            main_out.mkdir(parents=True, exist_ok=True)
        except OSError:
            main_out = None  # prepare_output_dir says what is wrong with it
    # One writer per run folder for the whole run (rank 0 writes every file): a second copy is refused, naming this one.
    lock = output_lock(cfg.output_dir, command="sonar-ft train") if main_out is not None else contextlib.nullcontext()
    try:
        with lock, attach_train_log(main_out):
            recipe = FineTuneRecipe(cfg, ddp, on_evaluation=on_evaluation, reuse_data=reuse_data)
            recipe.setup()
            result = recipe.train()
            if result.best_epoch is not None:
                log.info("run finished; the best evaluation was epoch %d (val BLEU %.2f, val loss %.4f)%s", result.best_epoch, result.best_val_bleu,
                         result.best_val_loss, " (stopped early)" if result.stopped_early else "")
    except BaseException:
        ddp.shutdown(finished=False)
        raise
    ddp.shutdown(finished=True)
    return result
