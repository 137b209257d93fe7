"""What a run shows and records while it trains: progress, step records, TensorBoard, ``train.log``.

- :class:`Progress`: tqdm bars in a terminal; elsewhere (a notebook cell, a file, Colab's log) a
  plain line every ``progress_seconds`` (at most ``LINES_PER_EPOCH`` an epoch) and one summary
  line per epoch, so a 30-epoch How2Sign run prints at most ~1,200 lines, not a bar refresh per step.
- :class:`StepRecorder`: every ``log_every_steps`` optimiser steps one record (loss and its
  cross-entropy / distillation terms, lr, gradient norm, tokens/s, clips/s, peak memory, elapsed)
  to ``steps.jsonl`` and to TensorBoard event files under ``tensorboard/``.
- :func:`attach_train_log`: everything the library logs also goes to ``train.log``, so a
  disconnected notebook loses nothing.

No torch here except inside TensorBoard's writer (imported only when asked for).
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

from sonar_ft.files import atomic
from sonar_ft.run_files import STEPS_FILE, TENSORBOARD_DIR, TRAIN_LOG
from sonar_ft.scores import ALIASES, METRICS

log = logging.getLogger(__name__)

LINES_PER_EPOCH = 40
"""At most this many plain progress lines per epoch (plus its summary line)."""

# TensorBoard tag of each step-record field (the jsonl keeps the field names).
STEP_TAGS = {
    "loss": "train/loss", "ce_loss": "train/ce_loss", "distill_loss": "train/distill_loss", "lr": "train/lr",
    "grad_norm": "train/grad_norm", "tokens_per_s": "train/tokens_per_s", "clips_per_s": "train/clips_per_s",
    "peak_memory_gib": "train/peak_memory_gib",
}
# TensorBoard tag of each epoch-record field: every validation score of sonar_ft.scores.METRICS as val/<metric>.
EPOCH_TAGS = {
    "train_loss": "epoch/train_loss", **{f"val_{m}": f"val/{m}" for m in METRICS if m not in ALIASES}, "lr": "epoch/lr",
    "samples_per_second": "epoch/clips_per_s",
}


def _fmt_seconds(seconds: float) -> str:
    seconds = max(0, int(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def progress_mode(setting: str, stream: Any = None) -> str:
    """``bar``, ``plain`` or ``none`` for ``--progress`` (``auto``: bars only when stdout is a terminal)."""
    if setting != "auto":
        return setting
    stream = stream if stream is not None else sys.stdout
    try:
        return "bar" if stream.isatty() else "plain"
    except (AttributeError, ValueError):
        return "plain"


class Progress:
    """Progress of the epochs and steps of one run, as bars or as plain periodic lines.

    ``clock`` and ``emit`` are injectable so the line budget can be tested without a model.
    """

    def __init__(
        self, mode: str, *, epochs: int, every_seconds: float = 30.0, emit: Callable[[str], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.mode, self.epochs, self.every, self.clock = mode, epochs, every_seconds, clock
        self.emit = emit or logging.getLogger("sonar_ft.training.run_dir").info  # the loop's logger (tuning quiets it)
        self._bar: Any = None
        self._epoch_bar: Any = None
        self._epoch = 0
        self._total = 0
        self._done = 0
        self._epoch_start = 0.0
        self._done_at_start = self._done_at_line = 0
        self._clips = 0
        self._last_line = 0.0

    def start(self, first_epoch: int) -> None:
        if self.mode == "bar":
            from tqdm.auto import tqdm

            self._epoch_bar = tqdm(total=self.epochs, initial=first_epoch - 1, desc="epochs")

    def epoch_start(self, epoch: int, batches: int, done: int = 0) -> None:
        """Epoch ``epoch`` of ``batches`` batches begins (``done`` of them already consumed before a resume)."""
        self._epoch, self._total, self._done, self._done_at_start, self._done_at_line = epoch, batches, done, done, done
        self._clips = 0
        self._epoch_start = self._last_line = self.clock()
        if self.mode == "bar":
            from tqdm.auto import tqdm

            self._bar = tqdm(total=batches, initial=done, desc=f"epoch {epoch}", leave=False)

    def update(self, batches: int, clips: int, *, step: int, loss: float, lr: float) -> None:
        """``batches`` more batches (``clips`` clips) went through; the numbers describe the latest optimiser step."""
        self._done += batches
        self._clips += clips
        if self.mode == "bar":
            self._bar.update(batches)
            self._bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.1e}", refresh=False)
        elif self.mode == "plain":
            now = self.clock()
            # Every `every` seconds, but at most LINES_PER_EPOCH lines an epoch (slow GPUs, long epochs).
            spaced = self._done - self._done_at_line >= self._total / LINES_PER_EPOCH
            if now - self._last_line >= self.every and spaced and self._done < self._total:
                self._last_line, self._done_at_line = now, self._done
                self.emit(self._line(now, step, loss, lr))

    def _line(self, now: float, step: int, loss: float, lr: float) -> str:
        elapsed = now - self._epoch_start
        clips_per_s = self._clips / elapsed if elapsed > 0 else 0.0
        rate = (self._done - self._done_at_start) / elapsed if elapsed > 0 else 0.0
        left = self._total - self._done
        eta_epoch = left / rate if rate > 0 else math.inf
        eta_run = eta_epoch + (self.epochs - self._epoch) * (self._total / rate if rate > 0 else math.inf)
        eta = f"ETA {_fmt_seconds(eta_epoch)} (run {_fmt_seconds(eta_run)})" if math.isfinite(eta_run) else "ETA ?"
        pct = 100 * self._done / max(self._total, 1)
        return (f"epoch {self._epoch}/{self.epochs} | batch {self._done}/{self._total} ({pct:.0f}%) | step {step} | "
                f"loss {loss:.4f} | lr {lr:.2e} | {clips_per_s:.1f} clips/s | {eta}")

    def epoch_end(self, summary: str) -> None:
        """The epoch's summary line (in every mode: it also goes to ``train.log``)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._epoch_bar is not None:
            self._epoch_bar.update(1)
        self.emit(summary)

    def close(self) -> None:
        for bar in (self._bar, self._epoch_bar):
            if bar is not None:
                bar.close()
        self._bar = self._epoch_bar = None


class StepRecorder:
    """``steps.jsonl`` and TensorBoard scalars every ``every`` optimiser steps.

    Every rank keeps its own sums (:meth:`add`); at a record the caller sums :meth:`take_local`
    over ranks and rank 0 (the one given an output folder) :meth:`write`\ s them.
    """

    def __init__(
        self, out: Path | None, *, every: int, reporters: list[str], distill_weight: float = 0.0, resumed_step: int | None = None,
    ) -> None:
        self.every = every
        self.distill_weight = distill_weight
        self.jsonl = out / STEPS_FILE if out is not None and every and "jsonl" in reporters else None
        if self.jsonl is not None and resumed_step is not None and self.jsonl.is_file():
            # Records written after the checkpoint this run resumes from are written again: drop the old ones.
            kept = [json.dumps(r) for r in read_steps(self.jsonl) if r.get("step", 0) <= resumed_step]
            atomic.write_text(self.jsonl, "".join(line + "\n" for line in kept))
        self.writer: Any = None
        if out is not None and "tensorboard" in reporters:
            self.writer = _tensorboard_writer(out / TENSORBOARD_DIR, None if resumed_step is None else resumed_step + 1)
        self._sums = [0.0, 0.0, 0.0, 0.0]  # token-loss sum, tokens, distillation sum, clips
        self._norms: list[float] = []
        self._started = time.perf_counter()
        self.run_started = self._started

    def add(self, ce_sum: float, tokens: int, distill_sum: float, clips: int, grad_norm: float | None) -> None:
        """One optimiser step's sums on this rank, and its (global) gradient norm."""
        for i, v in enumerate((ce_sum, tokens, distill_sum, clips)):
            self._sums[i] += v
        if grad_norm is not None and math.isfinite(grad_norm):
            self._norms.append(grad_norm)

    def take_local(self) -> tuple[float, float, float, float]:
        sums, self._sums = tuple(self._sums), [0.0, 0.0, 0.0, 0.0]
        return sums  # type: ignore[return-value]

    def write(
        self, *, step: int, epoch: int, lr: float, ce_sum: float, tokens: int, distill_sum: float, clips: int,
        peak_memory_gib: float | None,
    ) -> dict[str, Any]:
        """The record of the steps since the previous one (sums over all ranks); returns it."""
        now = time.perf_counter()
        seconds = max(now - self._started, 1e-9)
        ce = ce_sum / max(tokens, 1)
        distill = distill_sum / max(clips, 1)
        rec = {
            "step": step, "epoch": epoch, "loss": ce + self.distill_weight * distill, "ce_loss": ce,
            "distill_loss": distill if self.distill_weight > 0 else None, "lr": lr,
            "grad_norm": sum(self._norms) / len(self._norms) if self._norms else None,
            "tokens_per_s": tokens / seconds, "clips_per_s": clips / seconds, "peak_memory_gib": peak_memory_gib,
            "elapsed_s": now - self.run_started,
        }
        self._norms, self._started = [], now
        if self.jsonl is not None:
            atomic.append_lines(self.jsonl, [json.dumps(rec)])
        if self.writer is not None:
            with self._tensorboard_writes():
                for key, tag in STEP_TAGS.items():
                    if rec.get(key) is not None:
                        self.writer.add_scalar(tag, rec[key], step)
        return rec

    def _tensorboard_writes(self) -> Any:
        """A full disk met by TensorBoard's writer (raised on a later call) as one clear line."""
        return atomic.explain_full_disk(Path(self.writer.get_logdir()) / "events.out.tfevents", appended=True)

    def record_epoch(self, metrics: dict[str, Any], step: int) -> None:
        """The epoch's numbers (validation scores among them) as TensorBoard scalars at ``step``."""
        if self.writer is None:
            return
        with self._tensorboard_writes():
            for key, tag in EPOCH_TAGS.items():
                if metrics.get(key) is not None:
                    self.writer.add_scalar(tag, metrics[key], step)
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            writer, self.writer = self.writer, None
            with atomic.explain_full_disk(Path(writer.get_logdir()) / "events.out.tfevents", appended=True):
                writer.close()


def _tensorboard_writer(folder: Path, purge_step: int | None) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        log.warning("--report_to tensorboard: the tensorboard package is not installed (pip install tensorboard); "
                    "step records go to %s only", STEPS_FILE)
        return None
    # purge_step: TensorBoard hides the events a killed run wrote after the checkpoint resumed from.
    return SummaryWriter(log_dir=str(folder), purge_step=purge_step)


def read_steps(path: str | Path) -> list[dict[str, Any]]:
    """The records of a ``steps.jsonl`` (a last line cut short by a crash is skipped)."""
    out = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


class _TrainLogHandler(logging.FileHandler):
    """``train.log``: when the disk fills up the file stops (the console goes on and the save that meets the full
    disk says so in one line) instead of logging's "--- Logging error ---" traceback for every later line."""

    disk_full = False

    def emit(self, record: logging.LogRecord) -> None:
        if not self.disk_full:
            super().emit(record)

    def handleError(self, record: logging.LogRecord) -> None:
        exc = sys.exc_info()[1]
        if exc is not None and atomic.is_disk_full(exc, Path(self.baseFilename).parent):
            self.disk_full = True
            return
        super().handleError(record)


class attach_train_log:
    """Context manager: the ``sonar_ft`` loggers' INFO and above also go to ``folder/train.log`` (appended)."""

    def __init__(self, folder: Path | None) -> None:
        self.path = folder / TRAIN_LOG if folder is not None else None
        self.handler: logging.Handler | None = None
        self._level = logging.NOTSET

    def __enter__(self) -> "attach_train_log":
        if self.path is None:
            return self
        logger = logging.getLogger("sonar_ft")
        self.handler = _TrainLogHandler(self.path, encoding="utf-8", delay=True)
        self.handler.setLevel(logging.INFO)
        self.handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S"))
        logger.addHandler(self.handler)
        self._level = logger.level
        if logger.getEffectiveLevel() > logging.INFO:
            logger.setLevel(logging.INFO)  # the file gets INFO even when the console shows only warnings
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.handler is not None:
            logger = logging.getLogger("sonar_ft")
            logger.removeHandler(self.handler)
            logger.setLevel(self._level)
            self.handler.close()


def iter_lines(path: str | Path) -> Iterator[str]:
    """Lines of ``train.log`` (for notebooks showing the tail of a running job)."""
    yield from Path(path).read_text(encoding="utf-8").splitlines()


def epoch_line(m: Any, epochs: int) -> str:
    """One line per epoch: losses, BLEU, chrF, learning rate, seconds, and whether it is the best so far."""
    val = (
        f"val_loss {m.val_loss:.4f} | BLEU {m.val_bleu:.2f} | chrF {m.val_chrf:.2f}" if m.val_bleu is not None else "no evaluation"
    )
    star = " *best*" if m.is_best else ""
    return f"epoch {m.epoch}/{epochs} | train_loss {m.train_loss:.4f} | {val} | lr {m.lr:.2e} | {m.seconds:.1f}s{star}"
