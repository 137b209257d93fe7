"""Data-parallel training with ``torchrun``: one process per GPU (or CPU worker), one shared result.

``torchrun --nproc_per_node=N train_sonar_finetuning.py ...`` starts N copies of the recipe with
``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` set; :func:`setup` reads them, joins the process group
(NCCL on GPUs, gloo on CPU) and returns a :class:`DistContext` that the training loop asks the
few questions data parallelism needs:

- which device this process uses, and whether it is rank 0 (the only one that writes files);
- the global sums the training loop weights its micro-batches with (a window's target tokens over
  all ranks, see ``FineTuneRecipe.train_step``), and when to skip gradient synchronisation;
- the sums of per-rank numbers (training loss, tokens, clips) and the gathered evaluation parts.

Without ``WORLD_SIZE`` (or with 1) everything here is a no-op and ``train()`` runs as before.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import os
from dataclasses import dataclass
from typing import Any, Callable, Sequence, TypeVar

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from sonar_ft.data import SignFeatureDataset
from sonar_ft.errors import ConfigError

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass
class DistContext:
    """This process's place in a (possibly one-process) data-parallel run."""

    world_size: int = 1
    rank: int = 0
    local_rank: int = 0
    device: torch.device | None = None
    """The device torchrun assigned (``cuda:LOCAL_RANK`` or ``cpu``); None when not distributed."""

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that logs the plan and writes every file."""
        return self.rank == 0

    # -- models ----------------------------------------------------------------------------------
    def wrap(self, model: nn.Module) -> nn.Module:
        """``model`` wrapped in DistributedDataParallel (itself when not distributed).

        Keep a reference to the unwrapped model for saving and evaluation. Gradients live in
        DDP's communication buckets (no second copy of them).
        """
        if not self.active:
            return model
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if self.device is not None and self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids, gradient_as_bucket_view=True, broadcast_buffers=False)

    # -- collectives -----------------------------------------------------------------------------
    def no_sync(self, model: nn.Module) -> Any:
        """Context in which backward keeps gradients local (non-final micro-steps of a window); a no-op on one process."""
        if not self.active:
            import contextlib

            return contextlib.nullcontext()
        return model.no_sync()

    def sum(self, *values: float) -> tuple[float, ...]:
        """Element-wise sums over ranks (the values themselves when not distributed)."""
        if not self.active:
            return tuple(values)
        t = torch.tensor(values, dtype=torch.float64, device=self._comm_device())
        dist.all_reduce(t)
        return tuple(float(v) for v in t)

    def gather(self, obj: T) -> list[T]:
        """Every rank's ``obj`` (picklable), in rank order, on every rank."""
        if not self.active:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def on_main(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on rank 0 only and hand its result (or its project error) to every rank.

        For work that touches the output folder: the other ranks must not race rank 0, and
        must stop with the same error when it fails instead of waiting for it forever.
        """
        if not self.active:
            return fn()
        box: list[Any] = [None]
        if self.is_main:
            try:
                box[0] = ("ok", fn())
            except Exception as exc:  # handed to the other ranks, then raised here too
                box[0] = ("error", exc)
        dist.broadcast_object_list(box, src=0)
        kind, value = box[0]
        if kind == "error":
            raise value
        return value

    def gather_eval(
        self, ids: list[str], refs: list[str], hyps: list[str], loss_sum: float, token_sum: int, order: Sequence[str]
    ) -> tuple[list[str], list[str], list[str], float, int]:
        """Evaluation parts of all ranks, in the order one process would have produced (``order``: ids)."""
        if not self.active:
            return ids, refs, hyps, loss_sum, token_sum
        parts = self.gather((ids, refs, hyps, loss_sum, token_sum))
        position = {clip: i for i, clip in enumerate(order)}
        rows = sorted(
            ((position.get(i, len(position)), i, r, h) for p in parts for i, r, h in zip(p[0], p[1], p[2])),
            key=lambda row: row[0],
        )
        return (
            [row[1] for row in rows],
            [row[2] for row in rows],
            [row[3] for row in rows],
            sum(p[3] for p in parts),
            sum(p[4] for p in parts),
        )

    def eval_gatherer(self, dataset: Any) -> Callable[..., tuple[list[str], list[str], list[str], float, int]] | None:
        """The ``gather`` argument of :func:`sonar_ft.evaluate.evaluate` for ``dataset`` (None when not distributed).

        ``dataset`` is the whole validation set; results come back in the order one process
        evaluates it (by length, as the unshuffled sampler yields it).
        """
        if not self.active:
            return None
        order = [dataset.rows[i].id for i in np.argsort(dataset.lengths, kind="stable")]
        return lambda ids, refs, hyps, loss_sum, token_sum: self.gather_eval(ids, refs, hyps, loss_sum, token_sum, order)

    def shard(self, dataset: SignFeatureDataset) -> SignFeatureDataset:
        """This rank's share of an evaluation set: every ``world_size``-th clip by length, none repeated."""
        if not self.active:
            return dataset
        mine = sorted(np.argsort(dataset.lengths, kind="stable")[self.rank :: self.world_size].tolist())
        # Known lengths go into the rows, so the shard does not read frame counts again.
        rows = [dataclasses.replace(dataset.rows[i], length=int(dataset.lengths[i])) for i in mine]
        return SignFeatureDataset(
            dataset.store, rows, max_frames=dataset.max_frames, cache=dataset.cache, cache_dtype=dataset.cache_dtype, progress=False
        )

    def shutdown(self, finished: bool = True) -> None:
        """Leave the process group: at the end of the run (``finished``), or after an error.

        After a finished run every rank first waits for the others (rank 0 is still writing files
        when the others are done), so no rank tears the group down while a peer still uses it — the
        suspected cause of a rare gloo abort at exit ("terminate called without an active
        exception", once in about 20 two-process test runs) that failed a run which had succeeded.
        After an error there is no waiting: the peers may never arrive.
        """
        if self.active and dist.is_initialized():
            if finished:
                self.barrier()
            dist.destroy_process_group()

    def _comm_device(self) -> torch.device:
        # NCCL only moves CUDA tensors; gloo only CPU ones.
        return self.device if self.device is not None and self.device.type == "cuda" else torch.device("cpu")


def is_main_process() -> bool:
    """False in the torchrun processes of rank > 0 (for CLIs deciding whether to print)."""
    return os.environ.get("RANK", "0") == "0"


def world_size_from_env() -> int:
    """``WORLD_SIZE`` as torchrun sets it (1 when absent)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise ConfigError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not a number; start the recipe with torchrun") from None


def setup(device_name: str = "auto") -> DistContext:
    """Join the torchrun process group when ``WORLD_SIZE > 1``; else a one-process context.

    ``device_name`` is ``--device``: ``auto`` / ``cuda`` use ``cuda:LOCAL_RANK`` (NCCL) when GPUs
    are visible, ``cpu`` (or no GPU) uses gloo. One process per GPU: ``--device cuda:N`` is refused.
    """
    world = world_size_from_env()
    if world <= 1:
        return DistContext()
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device_name in ("auto", "cuda") and torch.cuda.is_available()
    if device_name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda under torchrun but no CUDA GPU is visible; use --device cpu (gloo) or auto")
    if device_name not in ("auto", "cuda", "cpu"):
        raise ConfigError(
            f"--device {device_name} under torchrun: each process takes the GPU of its LOCAL_RANK; use --device auto, cuda or cpu"
        )
    if use_cuda:
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(
                f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} GPU(s) visible: "
                "set --nproc_per_node to at most the number of GPUs"
            )
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=30))
    ctx = DistContext(world_size=world, rank=rank, local_rank=local_rank, device=device)
    log.info("data-parallel: rank %d of %d on %s (%s)", rank, world, device, backend)
    if rank != 0:
        # One voice: rank 0 logs progress; the others only warnings and errors, no progress bars.
        logging.getLogger("sonar_ft").setLevel(logging.WARNING)
        os.environ["TQDM_DISABLE"] = "1"
    return ctx
