"""Host RAM of a run's start-up and of resuming it: what a free Colab runtime (12.7 GB) must hold besides the GPU.

Start-up reads the encoder checkpoint into host memory (``load_torch``) and builds the encoder from it
by assignment, then the frozen decoder, one model at a time, each moved to the GPU before the next;
resuming memory-maps ``last.pt`` (encoder and optimiser state): its pages are the page cache's, which the
kernel reclaims, and the anonymous memory does not grow with it (``tests/training/test_resume_memory.py``
measures this on a multi-GB ``last.pt``). The resume figure here is the bound of a ``last.pt`` read whole (as
``torch.load`` without ``mmap`` does): baseline plus the largest file read at once. ``benchmarks/plan_check.py
--host`` measures these peaks at the official size.
"""

from __future__ import annotations

from dataclasses import dataclass

from sonar_ft.models.encoder import SignT5Config
from sonar_ft.plan.disk import checkpoint_sizes
from sonar_ft.plan.memory import GIB, DecoderSpec, sonar_decoder_spec

BASELINE_BYTES = int(0.85 * GIB)
"""Resident memory of the Python process once torch, fairseq2 and sonar are imported (measured on CPU,
``benchmarks/plan_check.py --host``; CUDA's own host-side libraries come on top on a GPU machine)."""

COLAB_FREE_RAM = int(12.7 * 1000**3)
"""Host RAM of a free Colab runtime."""


@dataclass(frozen=True)
class HostPlan:
    """Host RAM peaks of a run, bytes."""

    startup: int
    resume: int
    budget: int = COLAB_FREE_RAM

    @property
    def peak(self) -> int:
        return max(self.startup, self.resume)

    @property
    def fits(self) -> bool:
        return self.peak <= self.budget

    def format_table(self) -> str:
        verdict = "fits" if self.fits else "does NOT fit"
        return "\n".join([
            "host RAM (the machine's memory, not the GPU's):",
            f"  {'start-up':<18}{self.startup / GIB:8.2f} GiB (checkpoint read, models built, moved to the GPU)",
            f"  {'resume last.pt':<18}{self.resume / GIB:8.2f} GiB at most (as if read whole; the recipe memory-maps it)",
            f"  {'free Colab':<18}{self.budget / GIB:8.2f} GiB: {verdict} (L4 and A100 runtimes have more)",
        ])


def host_plan(config: SignT5Config | None = None, *, optimizer: str = "adamw", freeze_encoder_layers: int = 0,
              lora_rank: int = 0, decoder: DecoderSpec | None = None, decoder_checkpoint_bytes_per_param: int = 4,
              baseline: int = BASELINE_BYTES) -> HostPlan:
    """Host RAM peaks of start-up and resume for a run with these settings.

    The encoder checkpoint is the fp32 state dict; the decoder's file is read at
    ``decoder_checkpoint_bytes_per_param`` (fp32 as published) before it is cast and moved.
    """
    config = config or SignT5Config()
    spec = decoder or sonar_decoder_spec()
    best, last = checkpoint_sizes(config, optimizer=optimizer, freeze_encoder_layers=freeze_encoder_layers, lora_rank=lora_rank)
    encoder_file = best
    decoder_file = spec.params * decoder_checkpoint_bytes_per_param
    startup = baseline + max(encoder_file, decoder_file)
    # Resuming builds the models first (start-up's peak), then reads last.pt; a LoRA run also reads the base checkpoint.
    resume = max(startup, baseline + last)
    return HostPlan(startup=int(startup), resume=int(resume))
