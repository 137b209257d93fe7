"""``sonar-ft plan``: the memory plan and the disk plan of the official-size run for a GPU, and the flags that apply them."""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from sonar_ft.errors import ConfigError
from sonar_ft.files import atomic
from sonar_ft.progress import format_size
from sonar_ft.models.encoder import SignT5Config, read_config
from sonar_ft.run_files import BEST_ENCODER, LAST_STATE_SLOTS, STATE_SLOTS_FILE
from sonar_ft.plan.disk import (
    DECODER_CACHE_BYTES, DRIVE_FREE_BYTES, GB, DiskPlan, DriveUse, Schedule, disk_estimate, disk_plan, free_bytes,
)
from sonar_ft.plan.host import HostPlan, host_plan
from sonar_ft.plan.timing import TimePlan, time_plan
from sonar_ft.plan.memory import DEFAULT_MAX_FRAMES, DEFAULT_TARGET_TOKENS, GIB
from sonar_ft.plan.recommend import GPUS, Plan, gpu_spec, recommend, recommend_lora

ALTERNATIVE_LORA_RANK = 16
DEFAULT_EFFECTIVE_BATCH = 32


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``sonar-ft plan``."""
    p = subparsers.add_parser(
        "plan",
        help="estimate GPU memory of fine-tuning the official-size encoder and recommend settings that fit",
        description="Estimate memory (weights, gradients, optimiser states, activations, frozen decoder, loss) of "
        "fine-tuning the official SONAR ASL encoder and recommend recipe flags that fit the GPU; and where its "
        "checkpoints go so that Drive (trash included) and local disk hold a whole run.",
    )
    p.add_argument("--gpu", help=f"auto (this machine's GPU) or one of {', '.join(GPUS)} (not with --disk_only)")
    p.add_argument("--disk_only", action="store_true",
                   help="only the disk plan (where checkpoints go on Drive and local disk): no GPU needed")
    p.add_argument("--encoder_checkpoint", help="plan for this encoder's architecture, read from its tensors "
                   "(default: the official T5-v1.1-large size)")
    p.add_argument("--effective_batch", type=int, default=None,
                   help=f"clips per optimiser step, the recipe's --batch_size x --grad_accum (default {DEFAULT_EFFECTIVE_BATCH}); "
                   "the plan picks the micro-batch --batch_size that fits and the --grad_accum that reaches it")
    # Before --effective_batch this flag was named like the recipe's --batch_size, which is the micro-batch.
    p.add_argument("--batch_size", dest="old_batch_size", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--max_frames", type=int, default=DEFAULT_MAX_FRAMES, help="longest clip in frames (the recipe's --max_frames)")
    p.add_argument("--target_tokens", type=int, default=DEFAULT_TARGET_TOKENS, help="longest target sentence in tokens")
    p.add_argument("--lora_rank", type=int, default=0, help="plan LoRA fine-tuning with adapters of this rank (0: full fine-tuning)")
    p.add_argument("--json", dest="json_path", help="also write the plan (flags, estimate, disk plan) to this JSON file")
    d = p.add_argument_group("disk (Google Drive and the runtime's local disk)")
    d.add_argument("--drive_dir", help="the run folder on Drive: its free space is read (Colab's mount reports the quota's)")
    d.add_argument("--drive_gb", type=float, help=f"free space (GiB) on Drive, instead of --drive_dir (default: a free Drive's "
                   f"{DRIVE_FREE_BYTES / GIB:.0f}, minus nothing: pass the real one)")
    d.add_argument("--resume_dir", help="the run folder this run continues: checkpoint copies it already holds that the "
                   "run overwrites in place (--state_slots placements) count as free space")
    d.add_argument("--local_dir", help="the local folder of --state_dir: its free space is read")
    d.add_argument("--local_gb", type=float, help="free space (GiB) on local disk, instead of --local_dir (default: not checked)")
    d.add_argument("--encoder_gb", type=float, help="GB the downloaded encoder will add to Drive (default: its size; 0 when it "
                   "is already there or kept on local disk)")
    d.add_argument("--features_gb", type=float, default=0.0, help="GB the features (archive) will add to Drive (default 0: "
                   "already there)")
    d.add_argument("--decoder_cache_gb", type=float, default=DECODER_CACHE_BYTES / GB,
                   help="GB the decoder cache will add to Drive (0 when already there or kept on local disk)")
    d.add_argument("--tarball_gb", type=float, help="GB of the export written to Drive at the end (default: the encoder's size)")
    d.add_argument("--epochs", type=int, default=30, help="epochs of the run the disk plan simulates")
    d.add_argument("--saves_per_epoch", type=int, default=1,
                   help="saves of last.pt an epoch (at least: --checkpoint_every_minutes adds those its minutes make)")
    d.add_argument("--checkpoint_every_minutes", type=float, default=0.0,
                   help="the run's time-based saves: each epoch then saves 1 + (estimated epoch minutes / this) times")
    p.set_defaults(func=_plan_command)


def plan_record(plan: Plan, disk: DiskPlan, alternatives: list[tuple[str, DiskPlan]] | None = None,
                host: HostPlan | None = None, timing: TimePlan | None = None) -> dict[str, Any]:
    """The plan as JSON-ready data (what the notebooks read): flags, settings, estimate, disk plan, host RAM and time."""
    extra: dict[str, Any] = {}
    if host is not None:
        extra["host_ram"] = {"startup_gib": round(host.startup / GIB, 2), "resume_gib": round(host.resume / GIB, 2),
                             "budget_gib": round(host.budget / GIB, 2), "fits": host.fits, "table": host.format_table()}
    if timing is not None:
        extra["time_estimate"] = {"epoch_hours": round(timing.epoch_s / 3600, 2), "run_hours": round(timing.run_s / 3600, 1),
                                  "epochs": timing.epochs, "clips": timing.clips, "utilisation": timing.utilisation,
                                  "peak_tflops": timing.peak_tflops, "table": timing.format_table()}
    return extra | {
        "gpu": plan.gpu.name, "gpu_memory_gib": round(plan.gpu.memory_bytes / GIB, 1), "bf16": plan.gpu.bf16,
        "fits": plan.fits, "flags": plan.flags(), "settings": plan.settings, "effective_batch": plan.effective_batch,
        "estimate_gib": {k: round(v / GIB, 2) for k, v in plan.estimate.items()}, "budget_gib": round(plan.budget / GIB, 2),
        "table": plan.format_table(),
        "disk": disk_section(disk, alternatives or []),
    }


def effective_batch(args: argparse.Namespace) -> int:
    """``--effective_batch``, or the deprecated ``--batch_size`` (with a note on stderr saying what it meant)."""
    if args.old_batch_size is None:
        return DEFAULT_EFFECTIVE_BATCH if args.effective_batch is None else args.effective_batch
    if args.effective_batch is not None and args.effective_batch != args.old_batch_size:
        raise ConfigError(f"--batch_size {args.old_batch_size} and --effective_batch {args.effective_batch} disagree; "
                          "give only --effective_batch")
    print(f"note: `sonar-ft plan --batch_size` is deprecated: it is the effective batch here, while the recipe's "
          f"--batch_size is the micro-batch; use --effective_batch {args.old_batch_size}", file=sys.stderr)
    return args.old_batch_size


def disk_section(disk: DiskPlan, alternatives: list[tuple[str, DiskPlan]]) -> dict[str, Any]:
    """The plan JSON's ``disk`` part: the placement, its table, and the alternatives that would fit."""
    return {**_disk_record(disk), "table": disk.format_table(),
            "alternatives": [{"change": what, **_disk_record(alt)} for what, alt in alternatives]}


def _disk_record(disk: DiskPlan) -> dict[str, Any]:
    return {"strategy": disk.strategy, "fits": disk.fits, "needs_state_dir": disk.needs_state_dir, "flags": disk.flags(),
            "best_encoder_gb": round(disk.best_bytes / GB, 2), "last_gb": round(disk.state_bytes / GB, 2),
            "drive_peak_gb": round(disk.drive_peak / GB, 2), "drive_trash_gb": round(disk.drive_trash / GB, 2),
            "drive_free_gb": round(disk.drive_budget / GB, 2), "local_peak_gb": round(disk.local_peak / GB, 2),
            "drive_free_bytes": disk.drive_budget, "drive_peak_bytes": disk.drive_peak}


def _gb(value: float | None) -> int | None:
    return None if value is None else int(value * GB)


def _disk_inputs(args: argparse.Namespace, saves_per_epoch: int) -> dict[str, Any]:
    for flag in ("drive_gb", "local_gb", "encoder_gb", "features_gb", "decoder_cache_gb", "tarball_gb"):
        if getattr(args, flag) is not None and getattr(args, flag) < 0:
            raise ConfigError(f"--{flag} must be >= 0 (got {getattr(args, flag)})")
    if args.epochs < 1 or args.saves_per_epoch < 1:
        raise ConfigError("--epochs and --saves_per_epoch must be >= 1")
    drive = int(args.drive_gb * GIB) if args.drive_gb is not None else (
        free_bytes(args.drive_dir) if args.drive_dir else DRIVE_FREE_BYTES)
    if args.resume_dir:
        drive += overwritten_in_place(args.resume_dir)
    local = int(args.local_gb * GIB) if args.local_gb is not None else (free_bytes(args.local_dir) if args.local_dir else None)
    others = DriveUse(encoder=_gb(args.encoder_gb), features=int(args.features_gb * GB),
                      decoder_cache=int(args.decoder_cache_gb * GB), tarball=_gb(args.tarball_gb))
    return {"drive_budget": drive, "local_budget": local, "others": others,
            "schedule": Schedule(epochs=args.epochs, saves_per_epoch=saves_per_epoch)}


def overwritten_in_place(run_dir: str | Path) -> int:
    """Bytes of the checkpoint copies in ``run_dir`` that a resumed run overwrites in place (0 unless it keeps slots).

    Atomic saves (the ``drive`` placement) replace their files, which go to Drive's trash: those count as used.
    """
    run_dir = Path(run_dir)
    if not (run_dir / STATE_SLOTS_FILE).is_file():
        return 0
    return sum((run_dir / name).stat().st_size for name in (BEST_ENCODER, *LAST_STATE_SLOTS) if (run_dir / name).is_file())


def alternatives(disk: DiskPlan, settings: dict[str, Any], lora_rank: int, inputs: dict[str, Any],
                 config: SignT5Config | None = None) -> list[tuple[str, DiskPlan]]:
    """When the full placement does not fit (or only without a copy of last.pt): what would, with what it changes."""
    if disk.fits and disk.strategy in ("drive", "slots-2"):
        return []
    opts = dict(optimizer=settings["optimizer"], freeze_encoder_layers=settings["freeze_encoder_layers"], lora_rank=lora_rank)
    local_models = replace(inputs["others"], encoder=0, decoder_cache=0)
    tries = [("keep the encoder download and the decoder cache on local disk (downloaded again on each new runtime)",
              dict(opts), {**inputs, "others": local_models})]
    if not lora_rank and settings["optimizer"] == "adamw":
        tries.append(("that, and --optimizer adamw8bit (a setting of the run: another result than AdamW)",
                      {**opts, "optimizer": "adamw8bit"}, {**inputs, "others": local_models}))
    if not lora_rank:
        tries.append((f"LoRA (--lora_rank {ALTERNATIVE_LORA_RANK}; last.pt holds only the adapters)",
                      {**opts, "lora_rank": ALTERNATIVE_LORA_RANK, "freeze_encoder_layers": 0}, dict(inputs)))
    out: list[tuple[str, DiskPlan]] = []
    best = STRATEGY_RANK[disk.strategy] if disk.fits else len(STRATEGY_RANK)
    for what, kw, inp in tries:  # each offered only when it reaches a placement better than those before it
        alt = disk_plan(config, **kw, **inp)
        if alt.fits and STRATEGY_RANK[alt.strategy] < best:
            out.append((what, alt))
            best = STRATEGY_RANK[alt.strategy]
    return out


STRATEGY_RANK = {"drive": 0, "slots-2": 1, "slots-1": 2, "local-only": 3}


def _saves_per_epoch(args: argparse.Namespace, timing: TimePlan | None) -> int:
    """Saves of ``last.pt`` an epoch: ``--saves_per_epoch``, or more when time-based saves fit into the estimated epoch."""
    if args.checkpoint_every_minutes < 0:
        raise ConfigError(f"--checkpoint_every_minutes must be >= 0 (got {args.checkpoint_every_minutes})")
    if not args.checkpoint_every_minutes or timing is None:
        return args.saves_per_epoch
    return max(args.saves_per_epoch, 1 + int(timing.epoch_s / 60 // args.checkpoint_every_minutes))


def _plan_command(args: argparse.Namespace) -> int:
    if args.lora_rank < 0:
        raise ConfigError(f"--lora_rank must be >= 0 (got {args.lora_rank})")
    config = read_config(args.encoder_checkpoint) if args.encoder_checkpoint else None
    if args.disk_only:
        return _disk_only(args, config)
    if not args.gpu:
        raise ConfigError(f"--gpu is required: auto (this machine's GPU) or one of {', '.join(GPUS)}; "
                          "or --disk_only for the disk plan alone")
    batch = effective_batch(args)
    if batch < 1:
        raise ConfigError(f"--effective_batch must be >= 1 (got {batch})")
    gpu = gpu_spec(args.gpu)
    if args.lora_rank:
        plan = recommend_lora(gpu, batch, rank=args.lora_rank, max_frames=args.max_frames, target_tokens=args.target_tokens,
                              config=config)
    else:
        plan = recommend(gpu, batch, max_frames=args.max_frames, target_tokens=args.target_tokens, config=config)
    s = plan.settings
    timing = (time_plan(gpu.peak_tflops, config=config, gradient_checkpointing=s["gradient_checkpointing"],
                        lora=bool(args.lora_rank), max_frames=args.max_frames, epochs=args.epochs)
              if gpu.peak_tflops else None)
    inputs = _disk_inputs(args, _saves_per_epoch(args, timing))
    disk = disk_plan(config, optimizer=s["optimizer"], freeze_encoder_layers=s["freeze_encoder_layers"],
                     lora_rank=args.lora_rank, **inputs)
    alts = alternatives(disk, s, args.lora_rank, inputs, config)
    host = host_plan(config, optimizer=s["optimizer"], freeze_encoder_layers=s["freeze_encoder_layers"], lora_rank=args.lora_rank)
    print(plan.format_table())
    _print_disk(disk, alts)
    print(host.format_table())
    print(timing.format_table() if timing else "time: no estimate (this GPU's peak throughput is not known to the planner)")
    if args.lora_rank:
        adapter = disk_estimate(config, rank=args.lora_rank)["adapter"]
        print(f"  LoRA: adapter/ {adapter / 2**20:.1f} MiB (peft's format) next to best_encoder.pt (the merged encoder)")
    if args.json_path:
        atomic.write_json(args.json_path, plan_record(plan, disk, alts, host, timing))
    if not plan.fits:
        print("no setting fits this GPU by the estimate; lower --max_frames or use a larger GPU")
        return 1
    return 0


def _disk_only(args: argparse.Namespace, config: SignT5Config | None) -> int:
    """``--disk_only``: where the checkpoints of a run with AdamW (or LoRA) go; no GPU involved."""
    settings = {"optimizer": "adamw", "freeze_encoder_layers": 0}
    inputs = _disk_inputs(args, _saves_per_epoch(args, None))
    disk = disk_plan(config, lora_rank=args.lora_rank, **inputs)
    alts = alternatives(disk, settings, args.lora_rank, inputs, config)
    _print_disk(disk, alts)
    if args.json_path:
        atomic.write_json(args.json_path, {"flags": [], "settings": {}, "fits": True, "disk": disk_section(disk, alts)})
    return 0


def _print_disk(disk: DiskPlan, alts: list[tuple[str, DiskPlan]]) -> None:
    print(disk.format_table())
    if not disk.fits:
        print(f"  the run's files do NOT fit: free {format_size(disk.drive_peak - disk.drive_budget)} more on Drive "
              f"(empty its trash; remove old runs), or use a Drive with {format_size(disk.drive_peak)} free")
    for what, alt in alts:
        print(f"  fits ({alt.strategy}, Drive peak {format_size(alt.drive_peak)}) with: {what}")
