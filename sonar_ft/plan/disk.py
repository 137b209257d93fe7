"""Disk: where a run keeps ``best_encoder.pt`` and ``last.pt``, their sizes from the parameter counts, and each disk's peak."""

from __future__ import annotations

from dataclasses import dataclass

from sonar_ft.models.encoder import SignT5Config
from sonar_ft.plan.memory import GIB, _param_counts, lora_counts

GB = 1000**3


DRIVE_FREE_BYTES = 15 * GIB
"""A free Google Drive: "15 GB", which Drive's quota API reports as 15 GiB."""


@dataclass(frozen=True)
class DiskPlan:
    """Where ``best_encoder.pt`` and ``last.pt`` live, their sizes and the peak each disk must hold."""

    strategy: str
    """``drive`` (both in the run folder on Drive, atomic saves) or ``mirror-replace`` (last.pt on local
    disk, ``--state_dir``, copied to Drive after each epoch; the old Drive copy is deleted first)."""
    best_bytes: int
    state_bytes: int
    drive_peak: int
    local_peak: int
    drive_budget: int

    @property
    def fits(self) -> bool:
        return self.drive_peak <= self.drive_budget

    def format_table(self) -> str:
        """What is kept where, the peaks, and what a disconnect can cost."""
        b, st = self.best_bytes / GB, self.state_bytes / GB
        where = {
            "drive": f"run folder on Drive: best_encoder.pt {b:.1f} GB + last.pt {st:.1f} GB (each save writes a "
                     "temporary copy next to the old file)",
            "mirror-replace": f"Drive: best_encoder.pt {b:.1f} GB + a copy of last.pt {st:.1f} GB; local disk "
                              f"(--state_dir): last.pt {st:.1f} GB; the old Drive copy is deleted before the new one "
                              "is written (two copies do not fit)",
        }[self.strategy]
        cost = ("a disconnect loses the work since the last save of last.pt (an epoch, or --checkpoint_every_steps)"
                if self.strategy != "mirror-replace" else
                "a disconnect loses the work since the last copy to Drive (an epoch); one during the copy itself (a "
                "minute or two) leaves no copy of last.pt: continue by fine-tuning from best_encoder.pt (the "
                "optimiser state and the epochs after the best one are lost)")
        verdict = "fits" if self.fits else "does NOT fit"
        return "\n".join([
            f"disk plan ({self.strategy}): {where}",
            f"  Drive peak {self.drive_peak / GB:.1f} GB of {self.drive_budget / GB:.1f} GB: {verdict}; "
            f"local disk peak {self.local_peak / GB:.1f} GB",
            f"  {cost}",
            "  (files deleted through Colab's Drive mount go to Drive's trash, which counts until emptied)",
        ])


def checkpoint_sizes(config: SignT5Config | None = None, *, optimizer: str = "adamw",
                     freeze_encoder_layers: int = 0, lora_rank: int = 0) -> tuple[int, int]:
    """Bytes of ``best_encoder.pt`` (fp32 weights) and ``last.pt`` (trained weights + optimiser moments), from parameter counts.

    With LoRA ``last.pt`` holds only the adapters and the fully trained small modules (and their AdamW moments);
    ``best_encoder.pt`` is always the whole (merged) encoder.
    """
    config = config or SignT5Config()
    counts = _param_counts(config, freeze_encoder_layers)
    best = counts.total * 4
    if lora_rank:
        return best, lora_counts(config, lora_rank).trainable * (4 + 8)
    moments = counts.trainable * (8 if optimizer == "adamw" else 2)
    return best, best + moments


def disk_plan(config: SignT5Config | None = None, *, optimizer: str = "adamw", freeze_encoder_layers: int = 0,
              lora_rank: int = 0, drive_budget: int = DRIVE_FREE_BYTES) -> DiskPlan:
    """The simplest placement of a run's checkpoints whose peak on Drive fits ``drive_budget``.

    An atomic save needs the old file and the new one at once; ``best_encoder.pt`` and ``last.pt``
    are saved one after the other, so a peak is the larger of the two moments. If nothing fits, the
    last (smallest) placement is returned with ``fits`` False.
    """
    b, s = checkpoint_sizes(config, optimizer=optimizer, freeze_encoder_layers=freeze_encoder_layers, lora_rank=lora_rank)
    candidates = [
        DiskPlan("drive", b, s, max(2 * b + s, b + 2 * s), 0, drive_budget),
        DiskPlan("mirror-replace", b, s, max(2 * b + s, b + s), 2 * s, drive_budget),
    ]
    return next((p for p in candidates if p.fits), candidates[-1])


def disk_estimate(config: SignT5Config | None = None, *, rank: int = 0) -> dict[str, int]:
    """Bytes of a run's files: ``last.pt`` (per save), ``best_encoder.pt`` and, with LoRA, ``adapter/``."""
    config = config or SignT5Config()
    best, last = checkpoint_sizes(config, lora_rank=rank)
    # The adapter folder also holds the fully trained small modules (peft's modules_to_save).
    return {"last_pt": last, "best_encoder": best, "adapter": lora_counts(config, rank).trainable * 4 if rank else 0}
