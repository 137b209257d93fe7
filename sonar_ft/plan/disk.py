"""Disk: what a run puts on Google Drive and on the runtime's local disk, and a checkpoint placement that fits both.

Drive holds more than the run folder: the downloaded encoder, the features archive, the decoder cache, the
export tarball, and the trash that deleted or replaced files leave. Files deleted, or replaced by renaming
another file onto their name (every atomic save), go to Drive's trash and count against the quota until it is
emptied; a file overwritten in place keeps its identity and only gets a new revision, which Drive purges on
its own and does not count (our reading of the Drive API documentation; see sonar_ft.training.state_mirror).
:func:`simulate` walks a whole run (downloads, every save of every epoch, the export) over a Drive that keeps
trash and returns its peak; :func:`disk_plan` picks the simplest placement whose peak fits the free space.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

from sonar_ft.models.encoder import SignT5Config
from sonar_ft.progress import format_size
from sonar_ft.plan.memory import GIB, _param_counts, lora_counts

GB = 1000**3

DRIVE_FREE_BYTES = 15 * GIB
"""A free Google Drive: "15 GB", which Drive's quota API reports as 15 GiB."""
DECODER_CACHE_BYTES = int(3.5 * GB)
"""The SONAR text decoder and tokenizer in fairseq2's cache (estimate: ~0.9B parameters in fp32 + the tokenizer)."""
MARKER_BYTES = 1_000
"""``state_slots.json``, replaced atomically at each copy: the only trash the slot placements leave."""

STRATEGIES = ("drive", "slots-2", "slots-1", "local-only")
"""From simplest to leanest on Drive; ``mirror-replace`` (delete, then copy) is simulated for comparison only."""


@dataclass(frozen=True)
class DriveUse:
    """Bytes the workflow newly puts on Drive besides the run's checkpoints (0 for what is already there or kept locally)."""

    encoder: int | None = None
    """The downloaded official encoder (default: the size of ``best_encoder.pt``)."""
    features: int = 0
    decoder_cache: int = DECODER_CACHE_BYTES
    tarball: int | None = None
    """The export written at the end (default: the size of ``best_encoder.pt``)."""

    def total(self, best_bytes: int) -> int:
        return sum(self.sizes(best_bytes).values())

    def sizes(self, best_bytes: int) -> dict[str, int]:
        """Bytes of each item, defaults filled in."""
        return {"encoder": best_bytes if self.encoder is None else self.encoder, "features": self.features,
                "decoder_cache": self.decoder_cache, "tarball": best_bytes if self.tarball is None else self.tarball}


@dataclass(frozen=True)
class Schedule:
    """What a run saves: ``last.pt`` ``saves_per_epoch`` times an epoch, ``best_encoder.pt`` after ``best_saves`` epochs."""

    epochs: int = 30
    saves_per_epoch: int = 1
    best_saves: int | None = None
    """Evaluations that improve (default: every epoch, the worst case)."""


@dataclass(frozen=True)
class Usage:
    """Peaks of one simulated run (bytes): Drive with its trash, and local disk."""

    drive_peak: int
    drive_trash: int
    local_peak: int


class _Drive:
    """A quota: live files plus trash; ``peak`` is the largest total seen."""

    def __init__(self) -> None:
        self.live: dict[str, int] = {}
        self.trash = 0
        self.peak = 0

    def _note(self, extra: int = 0) -> None:
        self.peak = max(self.peak, sum(self.live.values()) + self.trash + extra)

    def new(self, name: str, size: int) -> None:
        self.live[name] = size
        self._note()

    def replace_atomic(self, name: str, size: int) -> None:
        """Write a temporary file, rename it onto ``name``: old and new at once, then the old one in the trash."""
        self._note(size)
        self.trash += self.live.get(name, 0)
        self.live[name] = size
        self._note()

    def delete(self, name: str) -> None:
        self.trash += self.live.pop(name, 0)
        self._note()

    def in_place(self, name: str, size: int) -> None:
        """Overwrite the same file (written from its start, then truncated): never both copies, no trash."""
        self.live[name] = max(size, self.live.get(name, 0))
        self._note()
        self.live[name] = size


def simulate(strategy: str, best_bytes: int, state_bytes: int, *, others: DriveUse | None = None,
             schedule: Schedule | None = None) -> Usage:
    """Drive's peak (trash included) and local disk's peak over a whole run with checkpoint placement ``strategy``."""
    others, schedule = others or DriveUse(), schedule or Schedule()
    b, s = best_bytes, state_bytes
    drive, sizes = _Drive(), others.sizes(best_bytes)
    for name in ("encoder", "features", "decoder_cache"):
        drive.new(name, sizes[name])
    # --state_dir holds last.pt and best_encoder.pt; an atomic local save holds the old and the new copy at once.
    local = 0 if strategy == "drive" else s + b + max(s, b)
    best_saves = schedule.epochs if schedule.best_saves is None else schedule.best_saves
    slots = {"slots-2": 2, "slots-1": 1}.get(strategy, 0)
    saves = 0
    for epoch in range(1, schedule.epochs + 1):
        if epoch <= best_saves:
            if strategy in ("drive", "mirror-replace"):
                drive.replace_atomic("best_encoder.pt", b)
            else:
                drive.in_place("best_encoder.pt", b)
                drive.replace_atomic("state_slots.json", MARKER_BYTES)
        for _ in range(schedule.saves_per_epoch):
            if strategy == "drive":
                drive.replace_atomic("last.pt", s)
            elif strategy == "mirror-replace":
                drive.delete("last.pt")
                drive.new("last.pt", s)
            elif slots:
                drive.in_place(f"last.slot{saves % slots}.pt", s)
                drive.replace_atomic("state_slots.json", MARKER_BYTES)
            saves += 1
    drive.new("export.tar.gz", sizes["tarball"])
    return Usage(drive.peak, drive.trash, local)


@dataclass(frozen=True)
class DiskPlan:
    """Where ``best_encoder.pt`` and ``last.pt`` live, and the peaks each disk must hold over the whole run."""

    strategy: str
    """``drive`` (both in the run folder, atomic saves), ``slots-2`` / ``slots-1`` (both written on local disk,
    ``--state_dir``, and copied into 2 / 1 fixed files in the run folder, overwritten in place), ``local-only``
    (``last.pt`` on local disk only; ``best_encoder.pt`` copied in place)."""
    best_bytes: int
    state_bytes: int
    drive_peak: int
    local_peak: int
    drive_budget: int
    drive_trash: int = 0
    others_bytes: int = 0
    local_budget: int | None = None
    schedule: Schedule = field(default_factory=Schedule)

    @property
    def fits(self) -> bool:
        return self.drive_peak <= self.drive_budget and (self.local_budget is None or self.local_peak <= self.local_budget)

    @property
    def needs_state_dir(self) -> bool:
        return self.strategy != "drive"

    def flags(self) -> list[str]:
        """Recipe flags of the placement (``--state_dir`` itself is a folder on the runtime: the caller adds it)."""
        slots = {"slots-2": "2", "slots-1": "1", "local-only": "0"}.get(self.strategy)
        return ["--state_slots", slots] if slots else []

    def format_table(self) -> str:
        """What is kept where, the peaks (trash included), and what a disconnect can cost."""
        b, st = format_size(self.best_bytes), format_size(self.state_bytes)
        where = {
            "drive": f"run folder: best_encoder.pt {b} + last.pt {st}, atomic saves (each replaced file "
                     "goes to Drive's trash)",
            "slots-2": f"local disk (--state_dir): last.pt {st} + best_encoder.pt {b}; run folder: two copies "
                       f"of last.pt and one of best_encoder.pt, overwritten in place (--state_slots 2, no trash)",
            "slots-1": f"local disk (--state_dir): last.pt {st} + best_encoder.pt {b}; run folder: one copy "
                       f"of each, overwritten in place (--state_slots 1, no trash)",
            "local-only": f"local disk (--state_dir): last.pt {st}; run folder: best_encoder.pt {b}, "
                          "overwritten in place (--state_slots 0)",
        }[self.strategy]
        cost = {
            "drive": "a disconnect loses the work since the last save of last.pt",
            "slots-2": "a disconnect loses the work since the last save (--checkpoint_every_minutes)",
            "slots-1": "a disconnect loses the work since the last save; one during the copy itself (minutes) leaves "
                       "no copy of last.pt: the run starts again",
            "local-only": "a disconnect loses the run's state: continue by fine-tuning from best_encoder.pt as a new run",
        }[self.strategy]
        verdict = "fits" if self.drive_peak <= self.drive_budget else "does NOT fit"
        local = "" if self.local_budget is None else (
            f" of {format_size(self.local_budget)} free: " + ("fits" if self.local_peak <= self.local_budget else "does NOT fit"))
        sch = self.schedule
        return "\n".join([
            f"disk plan ({self.strategy}): {where}",
            f"  Drive peak over {sch.epochs} epochs ({sch.saves_per_epoch} save(s) of last.pt an epoch): "
            f"{format_size(self.drive_peak)} of {format_size(self.drive_budget)} free: {verdict} (of which trash "
            f"{format_size(self.drive_trash)}, encoder / features / decoder cache / export {format_size(self.others_bytes)})",
            f"  local disk peak {format_size(self.local_peak)}{local}",
            f"  {cost}",
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
              lora_rank: int = 0, drive_budget: int = DRIVE_FREE_BYTES, others: DriveUse | None = None,
              schedule: Schedule | None = None, local_budget: int | None = None) -> DiskPlan:
    """The simplest placement of a run's checkpoints whose Drive peak (trash included) and local peak fit.

    Tried in the order of :data:`STRATEGIES`; when none fits, the leanest is returned with ``fits`` False.
    """
    b, s = checkpoint_sizes(config, optimizer=optimizer, freeze_encoder_layers=freeze_encoder_layers, lora_rank=lora_rank)
    others, schedule = others or DriveUse(), schedule or Schedule()
    plans = []
    for strategy in STRATEGIES:
        use = simulate(strategy, b, s, others=others, schedule=schedule)
        plans.append(DiskPlan(strategy, b, s, use.drive_peak, use.local_peak, drive_budget, use.drive_trash,
                              others.total(b), local_budget, schedule))
    return next((p for p in plans if p.fits), plans[-1])


def free_bytes(path: str | Path) -> int:
    """Free bytes where ``path`` is (Colab's Drive mount reports the quota's free space), from its nearest existing folder."""
    path = Path(path)
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def disk_estimate(config: SignT5Config | None = None, *, rank: int = 0) -> dict[str, int]:
    """Bytes of a run's files: ``last.pt`` (per save), ``best_encoder.pt`` and, with LoRA, ``adapter/``."""
    config = config or SignT5Config()
    best, last = checkpoint_sizes(config, lora_rank=rank)
    # The adapter folder also holds the fully trained small modules (peft's modules_to_save).
    return {"last_pt": last, "best_encoder": best, "adapter": lora_counts(config, rank).trainable * 4 if rank else 0}
