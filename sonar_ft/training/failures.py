"""What a run says when it cannot go on: out of GPU memory, diverged, bad clips, broken weights.

Each function turns one failure into a :class:`~sonar_ft.errors.SonarFtError` whose message names
the setting or file and what to do; nothing already written is lost.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from sonar_ft.config import TrainConfig
from sonar_ft.data.bad_samples import BadSample, format_bad_samples, write_bad_samples
from sonar_ft.errors import DataError, TrainingError
from sonar_ft.run_files import BAD_SAMPLES, BEST_ENCODER, LAST_STATE

log = logging.getLogger(__name__)

MAX_BAD_STEPS = 10  # consecutive non-finite losses / gradients (no good step between) before a run is stopped


def out_of_memory_error(cfg: TrainConfig) -> TrainingError:
    """What to say when the GPU runs out of memory: the settings that need less of it."""
    half = max(1, cfg.batch_size // 2)
    accum = cfg.grad_accum * cfg.batch_size // half
    tips = [f"--batch_size {half} --grad_accum {accum} (same effective batch of {half * accum})"]
    if not cfg.gradient_checkpointing:
        tips.append("--gradient_checkpointing")
    tips.append(f"--freeze_encoder_layers {cfg.freeze_encoder_layers + 6} (freeze more of the lower layers)")
    tips.append("a smaller --max_frames" + (f" than {cfg.max_frames}" if cfg.max_frames else " (e.g. 512)"))
    if cfg.precision != "bf16":
        tips.append("--precision bf16 on an Ampere or newer GPU")
    return TrainingError(
        f"the GPU ran out of memory at --batch_size {cfg.batch_size}. Settings that need less memory: "
        + "; ".join(tips) + ". `sonar-ft plan --gpu YOUR_GPU` estimates which of them fit."
    )


def screen_bad_samples(out: Path, cfg: TrainConfig, bad: list[BadSample]) -> None:
    """Record ``bad`` in ``bad_samples.tsv``, then stop (``--on_bad_sample error``) or go on without them (``skip``)."""
    path = out / BAD_SAMPLES
    if not bad:
        path.unlink(missing_ok=True)  # a list from an earlier start no longer applies
        return
    write_bad_samples(path, bad)
    if cfg.on_bad_sample == "skip":
        log.warning("--on_bad_sample skip: leaving out %d bad clip(s), listed in %s", len(bad), path)
        return
    raise DataError(
        f"{len(bad)} clip(s) cannot be trained on: {format_bad_samples(bad)}. All are listed in {path}. "
        "Fix or remove them (`sonar-ft verify` shows details), or pass --on_bad_sample skip to train without them."
    )


def count_bad_step(bad_steps: int, out: Path, cfg: TrainConfig, what: str, where: str) -> int:
    """Warn about a skipped step; stop once ``MAX_BAD_STEPS`` came without a good step between."""
    bad_steps += 1
    log.warning("non-finite %s at %s: step skipped (%d in a row)", what, where, bad_steps)
    if bad_steps < MAX_BAD_STEPS:
        return bad_steps
    saved = [str(out / n) for n in (LAST_STATE, BEST_ENCODER) if cfg.save_checkpoints and (out / n).is_file()]
    last_good = (
        f"The last good checkpoint is {saved[0]}" + (f" (best encoder: {saved[1]})" if len(saved) > 1 else "")
        + "; nothing was saved after it. Continue from it with --resume"
        if saved else "No checkpoint was saved yet. Start again"
    )
    raise TrainingError(
        f"{bad_steps} steps in a row had a non-finite loss or gradient (last: {what} at {where}): training diverged. "
        f"{last_good} after lowering --learning_rate (e.g. to {cfg.learning_rate / 2:g})"
        + (" or with --precision fp32" if cfg.precision != "fp32" else "") + "."
    )


def weights_finite(model: torch.nn.Module) -> bool:
    """True when no parameter holds NaN or Inf (one device sync for the whole model)."""
    flags = [torch.isfinite(p).all() for p in model.parameters()]
    return bool(torch.stack(flags).all()) if flags else True


def refuse_broken_weights(encoder: torch.nn.Module, path: Path, where: str) -> None:
    if not weights_finite(encoder):
        raise TrainingError(
            f"the encoder's weights became NaN/Inf at {where}; not writing them to {path}, which keeps the last good "
            "state. Lower --learning_rate and continue with --resume."
        )
