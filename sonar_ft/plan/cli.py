"""``sonar-ft plan``: the memory plan and the disk plan of the official-size run for a GPU, and the flags that apply them."""

from __future__ import annotations

import argparse
from typing import Any

from sonar_ft.errors import ConfigError
from sonar_ft.files import atomic
from sonar_ft.plan.disk import DRIVE_FREE_BYTES, GB, DiskPlan, disk_estimate, disk_plan
from sonar_ft.plan.memory import DEFAULT_MAX_FRAMES, DEFAULT_TARGET_TOKENS, GIB
from sonar_ft.plan.recommend import GPUS, Plan, gpu_spec, recommend, recommend_lora

def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``sonar-ft plan``."""
    p = subparsers.add_parser(
        "plan",
        help="estimate GPU memory of fine-tuning the official-size encoder and recommend settings that fit",
        description="Estimate memory (weights, gradients, optimiser states, activations, frozen decoder, loss) of "
        "fine-tuning the official SONAR ASL encoder and recommend recipe flags that fit the GPU.",
    )
    p.add_argument("--gpu", required=True, help=f"auto (this machine's GPU) or one of {', '.join(GPUS)}")
    p.add_argument("--batch_size", type=int, default=32, help="effective batch (reached with --grad_accum)")
    p.add_argument("--max_frames", type=int, default=DEFAULT_MAX_FRAMES, help="longest clip in frames (the recipe's --max_frames)")
    p.add_argument("--target_tokens", type=int, default=DEFAULT_TARGET_TOKENS, help="longest target sentence in tokens")
    p.add_argument("--drive_gb", type=float, default=DRIVE_FREE_BYTES / GIB,
                   help="free space (GiB) where the run folder is, e.g. Google Drive (default: a free Drive's 15)")
    p.add_argument("--json", dest="json_path", help="also write the plan (flags, estimate, disk plan) to this JSON file")
    p.add_argument("--lora_rank", type=int, default=0, help="plan LoRA fine-tuning with adapters of this rank (0: full fine-tuning)")
    p.set_defaults(func=_plan_command)


def plan_record(plan: Plan, disk: DiskPlan) -> dict[str, Any]:
    """The plan as JSON-ready data (what the notebooks read): flags, settings, estimate and disk plan."""
    return {
        "gpu": plan.gpu.name, "gpu_memory_gib": round(plan.gpu.memory_bytes / GIB, 1), "bf16": plan.gpu.bf16,
        "fits": plan.fits, "flags": plan.flags(), "settings": plan.settings, "effective_batch": plan.effective_batch,
        "estimate_gib": {k: round(v / GIB, 2) for k, v in plan.estimate.items()}, "budget_gib": round(plan.budget / GIB, 2),
        "table": plan.format_table(),
        "disk": {"strategy": disk.strategy, "fits": disk.fits, "best_encoder_gb": round(disk.best_bytes / GB, 2),
                 "last_gb": round(disk.state_bytes / GB, 2), "drive_peak_gb": round(disk.drive_peak / GB, 2),
                 "local_peak_gb": round(disk.local_peak / GB, 2), "table": disk.format_table()},
    }


def _plan_command(args: argparse.Namespace) -> int:
    if args.lora_rank < 0:
        raise ConfigError(f"--lora_rank must be >= 0 (got {args.lora_rank})")
    gpu = gpu_spec(args.gpu)
    if args.lora_rank:
        plan = recommend_lora(gpu, args.batch_size, rank=args.lora_rank, max_frames=args.max_frames, target_tokens=args.target_tokens)
    else:
        plan = recommend(gpu, args.batch_size, max_frames=args.max_frames, target_tokens=args.target_tokens)
    s = plan.settings
    disk = disk_plan(optimizer=s["optimizer"], freeze_encoder_layers=s["freeze_encoder_layers"], lora_rank=args.lora_rank,
                     drive_budget=int(args.drive_gb * GIB))
    print(plan.format_table())
    print(disk.format_table())
    if args.lora_rank:
        adapter = disk_estimate(rank=args.lora_rank)["adapter"]
        print(f"  LoRA: adapter/ {adapter / 2**20:.1f} MiB (peft's format) next to best_encoder.pt (the merged encoder)")
    if args.json_path:
        atomic.write_json(args.json_path, plan_record(plan, disk))
    if not plan.fits:
        print("no setting fits this GPU by the estimate; lower --max_frames or use a larger GPU")
        return 1
    return 0
