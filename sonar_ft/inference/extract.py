"""``sonar-ft extract``: sign videos -> SignHiera features, in the layout training reads (``<id>.npy``, (T, 768)).

    sonar-ft extract videos/ --signhiera checkpoints/dm_70h_ub_signhiera.pth --out features/train
    sonar-ft extract --how2sign-csv how2sign_realigned_train.csv --video-dir raw_videos/ --signhiera ... --out ...

Each video is decoded and cropped (:mod:`sonar_ft.data.video`), cut into 128-frame windows, and the
windows of several videos go through SignHiera together (bf16 / fp16 on a GPU). A video's vectors are
written once all its windows are done, atomically: a feature file that exists is complete. The output
folder also gets

- ``extract_report.jsonl``: one line per video and attempt (status ok / failed, frames, fps, windows,
  vectors, seconds, crop box, or the reason it failed);
- ``extract_config.json``: the checkpoint (and its SHA-256), crop and model settings used.

Running the same command again skips every video already done (its report line says ok and its file
reads back with that shape) and retries the failed ones; a bad video is reported and the rest go on.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sonar_ft.data.manifest import read_manifest
from sonar_ft.data.video import (
    CROPS,
    DEFAULT_MAX_MINUTES,
    WINDOW_FRAMES,
    WINDOW_STEP,
    DecodedVideo,
    FaceDetector,
    normalise,
    read_video,
)
from sonar_ft.device import resolve_device
from sonar_ft.errors import ConfigError, DataError, OutputDirError, SonarFtError, VideoError
from sonar_ft.files import atomic
from sonar_ft.files.guards import check_output_not_input
from sonar_ft.files.lock import output_lock
from sonar_ft.models.signhiera import OFFICIAL_FILE_NAME, OFFICIAL_URL, SignHiera, load_signhiera

logger = logging.getLogger(__name__)

REPORT_NAME = "extract_report.jsonl"
CONFIG_NAME = "extract_config.json"
VIDEO_SUFFIXES = (".mp4", ".mov", ".mkv", ".avi", ".webm", ".m4v", ".mpg", ".mpeg")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DEFAULT_SIGNHIERA = Path("checkpoints") / OFFICIAL_FILE_NAME
# Settings that change the features: a folder's files must all have been made with the same ones.
_SAME_FEATURES_KEYS = ("signhiera_sha256", "crop", "model")


@dataclass
class ExtractSettings:
    """How videos are turned into features (one definition: the command line and the notebook use it)."""

    crop: str = "face"
    """``face`` (box around the signer from face detection), ``center`` (largest centred square) or ``none``."""
    batch_size: int = 4
    """Windows per forward pass, across videos (one official window: 77 MB of input in fp32)."""
    device: str = "auto"
    """``auto`` | ``cpu`` | ``cuda`` | ``cuda:N``."""
    precision: str = "auto"
    """``auto`` (bf16 on GPUs that support it, else fp16; fp32 on the CPU) | ``fp32`` | ``bf16`` | ``fp16``."""
    workers: int = 2
    """Videos decoded ahead, in parallel with the model."""
    max_minutes: float = DEFAULT_MAX_MINUTES
    """Longer videos are reported as failed (their cropped frames are held in memory, ~150 KB each)."""

    def check(self) -> None:
        if self.crop not in CROPS:
            raise ConfigError(f"--crop {self.crop!r}: use one of {', '.join(CROPS)}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"--precision {self.precision!r}: use one of {', '.join(PRECISIONS)}")
        for flag, value in (("--batch-size", self.batch_size), ("--workers", self.workers)):
            if value < 1:
                raise ConfigError(f"{flag} must be at least 1 (got {value})")
        if not self.max_minutes > 0:
            raise ConfigError(f"--max-minutes must be > 0 (got {self.max_minutes})")


@dataclass(frozen=True)
class VideoJob:
    """One video to extract: its clip id (the feature file's stem) and path."""

    id: str
    path: Path


@dataclass
class ExtractSummary:
    """What one call did, for the command's last lines and the notebook."""

    done: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    windows: int = 0
    seconds: float = 0.0
    video_seconds: float = 0.0

    @property
    def windows_per_second(self) -> float:
        return self.windows / self.seconds if self.seconds > 0 else 0.0


@dataclass(eq=False)  # identity: one per video
class _Pending:
    job: VideoJob
    video: DecodedVideo
    started: float
    outputs: list[torch.Tensor | None]

    @property
    def complete(self) -> bool:
        return all(o is not None for o in self.outputs)


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------


def collect_videos(
    paths: Sequence[str | Path] = (),
    *,
    list_file: str | Path | None = None,
    how2sign_csv: str | Path | None = None,
    video_dir: str | Path | None = None,
) -> list[VideoJob]:
    """The videos to extract: files and folders (their videos, sorted), a list file, or How2Sign's CSV.

    A list file has one video path per line (relative to the list's folder; ``#`` starts a comment).
    How2Sign's CSV names clips (``SENTENCE_NAME``); their videos are ``VIDEO_DIR/<name>.mp4``. Clip ids
    are file stems and must be unique.
    """
    jobs: list[VideoJob] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix.lower() in VIDEO_SUFFIXES and p.is_file())
            if not found:
                raise ConfigError(f"folder {path} holds no videos ({', '.join(VIDEO_SUFFIXES)})")
            jobs += [VideoJob(p.stem, p) for p in found]
        else:
            jobs.append(VideoJob(path.stem, path))  # a missing file is reported as failed, the rest go on
    if list_file is not None:
        list_file = Path(list_file)
        try:
            lines = list_file.read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            raise ConfigError(f"--list {list_file}: {exc.strerror or exc}") from None
        for line in lines:
            line = line.split("#", 1)[0].strip()
            if line:
                path = Path(line) if Path(line).is_absolute() else list_file.parent / line
                jobs.append(VideoJob(path.stem, path))
    if how2sign_csv is not None:
        if video_dir is None:
            raise ConfigError("--how2sign-csv needs --video-dir, the folder of the clips' .mp4 files")
        jobs += [VideoJob(row.id, Path(video_dir) / f"{row.id}.mp4") for row in read_manifest(how2sign_csv)]
    elif video_dir is not None:
        raise ConfigError("--video-dir goes with --how2sign-csv; to extract a folder, pass it as an argument")
    if not jobs:
        raise ConfigError("no videos given: pass video files or folders, --list FILE, or --how2sign-csv with --video-dir")
    seen: dict[str, Path] = {}
    for job in jobs:
        if job.id in seen and seen[job.id] != job.path:
            raise ConfigError(f"two videos would write the same feature file {job.id}.npy: {seen[job.id]} and "
                              f"{job.path}. Rename one, or extract them into different --out folders")
        seen[job.id] = job.path
    return list({job.id: job for job in jobs}.values())


def read_report(out_dir: str | Path) -> dict[str, dict[str, Any]]:
    """The last report line of each video in ``out_dir`` (lines cut short by a crash are skipped)."""
    path = Path(out_dir) / REPORT_NAME
    entries: dict[str, dict[str, Any]] = {}
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(entry, dict) and "id" in entry:
                entries[str(entry["id"])] = entry
    return entries


def is_done(out_dir: Path, clip_id: str, entry: dict[str, Any] | None, feature_dim: int) -> bool:
    """True when the report says ``clip_id`` is done and its feature file reads back with that shape."""
    if not entry or entry.get("status") != "ok":
        return False
    path = out_dir / f"{clip_id}.npy"
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError):
        return False
    return array.ndim == 2 and array.shape == (entry.get("vectors"), feature_dim)


# --------------------------------------------------------------------------------------------
# Extraction
# --------------------------------------------------------------------------------------------


def resolve_precision(name: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``name`` on ``device`` (None: plain fp32)."""
    if name == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if name == "fp32":
        return None
    if device.type != "cuda":
        raise ConfigError(f"--precision {name} needs a GPU; on the CPU use --precision fp32 (or auto)")
    if name == "bf16" and not torch.cuda.is_bf16_supported():
        raise ConfigError("--precision bf16 needs a GPU with bf16 support (Ampere or newer); use --precision fp16")
    return torch.bfloat16 if name == "bf16" else torch.float16


def _prefetched(jobs: Sequence[VideoJob], settings: ExtractSettings, size: int,
                detector: FaceDetector | None) -> Iterator[tuple[VideoJob, DecodedVideo | str]]:
    """Decode videos ``settings.workers`` ahead of the model, in order; a failure comes as its reason."""

    def read(job: VideoJob) -> DecodedVideo | str:
        try:
            return read_video(job.path, crop=settings.crop, size=size, detector=detector,
                              max_minutes=settings.max_minutes)
        except SonarFtError as exc:
            return str(exc)
        except (OSError, ValueError, RuntimeError, MemoryError) as exc:  # anything one video can throw
            return f"cannot read {job.path}: {type(exc).__name__}: {exc}"

    with ThreadPoolExecutor(max_workers=settings.workers) as pool:
        ahead: list[tuple[VideoJob, Future]] = []
        queue = iter(jobs)
        for job in queue:
            ahead.append((job, pool.submit(read, job)))
            if len(ahead) > settings.workers:
                break
        while ahead:
            job, future = ahead.pop(0)
            nxt = next(queue, None)
            if nxt is not None:
                ahead.append((nxt, pool.submit(read, nxt)))
            yield job, future.result()


def extract_videos(
    model: SignHiera,
    jobs: Sequence[VideoJob],
    out_dir: str | Path,
    *,
    settings: ExtractSettings = ExtractSettings(),
    detector: FaceDetector | None = None,
    progress: Callable[[ExtractSummary, int], None] | None = None,
    checkpoint_record: dict[str, Any] | None = None,
) -> ExtractSummary:
    """Extract ``jobs`` into ``out_dir`` (``<id>.npy`` + report); skip those already done; return a summary.

    The model must already be on its device. ``progress(summary, total)`` is called after each video.
    ``checkpoint_record`` (path, SHA-256) goes into ``extract_config.json``; a folder extracted with
    other settings is refused (features of one folder must come from one model and crop).
    """
    settings.check()
    config = model.config
    check_window_shape(config)
    size = config.input_size[1]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic.remove_stale_temps(out_dir)
    record = {**(checkpoint_record or {}), "crop": settings.crop, "model": dataclasses.asdict(config),
              "window_frames": WINDOW_FRAMES, "window_step": WINDOW_STEP,
              "settings": dataclasses.asdict(settings)}
    record = json.loads(json.dumps(record))  # tuples -> lists: compared with what the folder's JSON holds
    _check_same_settings(out_dir, record)
    atomic.write_json(out_dir / CONFIG_NAME, record)

    device = next(model.parameters()).device
    autocast = resolve_precision(settings.precision, device)
    report = read_report(out_dir)
    summary = ExtractSummary()
    todo = []
    for job in jobs:
        if is_done(out_dir, job.id, report.get(job.id), config.feature_dim):
            summary.skipped.append(job.id)
        else:
            todo.append(job)
    if summary.skipped:
        logger.info("%d of %d videos already extracted in %s: skipping them", len(summary.skipped), len(jobs), out_dir)
    start = time.perf_counter()
    queue: list[tuple[_Pending, int]] = []

    def finish(item: _Pending) -> None:
        features = torch.cat([o for o in item.outputs if o is not None]).numpy()  # (T, D)
        video = item.video
        entry: dict[str, Any] = {
            "id": item.job.id, "video": str(item.job.path), "frames": video.info.frames,
            "fps": round(video.info.fps, 4), "width": video.info.width, "height": video.info.height,
            "windows": len(video.windows), "padding_last": video.windows[-1].padding,
            "vectors": int(features.shape[0]), "video_seconds": round(video.info.seconds, 3),
            "crop": video.crop, "crop_box": list(video.crop_box), "faces_found": video.faces_found,
            "seconds": round(time.perf_counter() - item.started, 3),
        }
        if not np.isfinite(features).all():
            _failed(out_dir, summary, item.job, "SignHiera gave NaN/Inf features (broken weights, or fp16 overflow: "
                    "try --precision bf16 or fp32)", entry)
            return
        with atomic.atomic_path(out_dir / f"{item.job.id}.npy") as tmp, open(tmp, "wb") as f:
            np.save(f, features.astype(np.float32))  # a file object: np.save would append ".npy" to the temp name
        atomic.append_lines(out_dir / REPORT_NAME, [json.dumps({**entry, "status": "ok"})])
        summary.done.append(item.job.id)
        summary.windows += len(video.windows)
        summary.video_seconds += video.info.seconds
        item.video.frames = np.empty((0,), np.uint8)  # frees the frames now, not when the last window is gone

    def run(batch: list[tuple[_Pending, int]]) -> None:
        arrays = np.stack([normalise(item.video.window(item.video.windows[i])) for item, i in batch])
        padding = [item.video.windows[i].padding for item, i in batch]
        x = torch.from_numpy(arrays).to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=autocast) if autocast is not None else contextlib.nullcontext():
            outputs = model.extract(x, padding)
        for (item, i), out in zip(batch, outputs):
            item.outputs[i] = out.float().cpu()
        for item in dict.fromkeys(item for item, _ in batch):
            if item.complete:
                finish(item)
                _report_progress()

    def _report_progress() -> None:
        summary.seconds = time.perf_counter() - start
        if progress is not None:
            progress(summary, len(jobs))

    was_training = model.training
    model.eval()
    try:
        for job, video in _prefetched(todo, settings, size, detector):
            if isinstance(video, str):
                _failed(out_dir, summary, job, video)
                _report_progress()
                continue
            item = _Pending(job, video, time.perf_counter(), [None] * len(video.windows))
            queue += [(item, i) for i in range(len(video.windows))]
            while len(queue) >= settings.batch_size:
                batch, queue = queue[: settings.batch_size], queue[settings.batch_size:]
                run(batch)
        while queue:
            batch, queue = queue[: settings.batch_size], queue[settings.batch_size:]
            run(batch)
    finally:
        model.train(was_training)
    summary.seconds = time.perf_counter() - start
    return summary


def check_window_shape(config: Any) -> None:
    """Refuse a SignHiera whose input is not square 128-frame windows (what the video sampling makes)."""
    t, h, w = config.input_size
    if t != WINDOW_FRAMES or h != w:
        raise ConfigError(f"the SignHiera takes windows of {t} x {h} x {w} (frames x height x width); the video "
                          f"sampling makes square {WINDOW_FRAMES}-frame windows. Use the official checkpoint")


def _failed(out_dir: Path, summary: ExtractSummary, job: VideoJob, reason: str, entry: dict[str, Any] | None = None) -> None:
    logger.warning("skipping %s: %s", job.path, reason)
    summary.failed[job.id] = reason
    line = {**(entry or {"id": job.id, "video": str(job.path)}), "status": "failed", "reason": reason}
    atomic.append_lines(out_dir / REPORT_NAME, [json.dumps(line)])


def _check_same_settings(out_dir: Path, record: dict[str, Any]) -> None:
    path = out_dir / CONFIG_NAME
    if not path.is_file():
        return
    try:
        before = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return  # unreadable: rewritten below; the files' shapes are still checked one by one
    changed = [k for k in _SAME_FEATURES_KEYS if k in before and before.get(k) != record.get(k)]
    if changed:
        raise ConfigError(
            f"--out {out_dir} holds features extracted with another {', '.join(changed)} "
            f"({', '.join(f'{k}={json.dumps(before.get(k))[:80]}' for k in changed)}); one folder's features must all "
            "come from the same model and crop. Choose a new --out, or delete that folder's .npy files first"
        )


def extract_features(
    model: SignHiera,
    videos: Iterable[str | Path],
    *,
    settings: ExtractSettings = ExtractSettings(),
    detector: FaceDetector | None = None,
) -> dict[str, torch.Tensor]:
    """Features of a few videos in memory (``translate --video``): ``{stem: (T, D) float32}``.

    Raises :class:`VideoError` for the first video that cannot be used.
    """
    check_window_shape(model.config)
    device = next(model.parameters()).device
    autocast = resolve_precision(settings.precision, device)
    size = model.config.input_size[1]
    out: dict[str, torch.Tensor] = {}
    model.eval()
    for path in videos:
        video = read_video(path, crop=settings.crop, size=size, detector=detector, max_minutes=settings.max_minutes)
        pieces = []
        for s in range(0, len(video.windows), settings.batch_size):
            chunk = video.windows[s: s + settings.batch_size]
            x = torch.from_numpy(np.stack([normalise(video.window(w)) for w in chunk])).to(device)
            with torch.autocast(device.type, dtype=autocast) if autocast is not None else contextlib.nullcontext():
                pieces += [o.float().cpu() for o in model.extract(x, [w.padding for w in chunk])]
        out[Path(path).stem] = torch.cat(pieces)
    return out


def checkpoint_record(path: str | Path) -> dict[str, Any]:
    """What ``extract_config.json`` keeps of the SignHiera file: its path and SHA-256."""
    return {"signhiera": str(Path(path).resolve()), "signhiera_sha256": atomic.checkpoint_sha256(path)}


def load_for_extraction(path: str | Path, device: str = "auto") -> SignHiera:
    """Load the SignHiera at ``path`` onto ``device`` (``auto``: the GPU when there is one); clear error if missing."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            f"--signhiera {path} not found. Download the official SignHiera weights (CC-BY-NC 4.0) with: "
            f"sonar-ft download signhiera --out {path.parent}/"
        )
    return load_signhiera(path, device=resolve_device(device))


def expected_windows(seconds: float, fps: float = 30.0) -> int:
    """Windows a video of ``seconds`` makes (one per 128 frames, plus the overlapping last one)."""
    frames = max(1, round(seconds * fps))
    span = 2 * WINDOW_FRAMES / 25.0 * fps
    return max(1, math.ceil(max(0.0, frames - span + 1) / WINDOW_STEP) + 1)


# --------------------------------------------------------------------------------------------
# Command
# --------------------------------------------------------------------------------------------


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``extract`` to the ``sonar-ft`` command."""
    d = ExtractSettings()
    p = subparsers.add_parser(
        "extract",
        help="sign videos -> SignHiera features (<id>.npy) for training and translation",
        description="Extract SignHiera features from videos (files, folders, --list, or How2Sign's CSV with "
        f"--video-dir) into --out as <id>.npy (T, 768), with {REPORT_NAME} (one line per video) and {CONFIG_NAME}. "
        "Run it again to resume: videos done are skipped, failed ones retried.",
    )
    p.add_argument("videos", nargs="*", type=Path, help="video files or folders of videos")
    p.add_argument("--list", dest="list_file", type=Path, help="file with one video path per line")
    p.add_argument("--how2sign-csv", "--how2sign_csv", dest="how2sign_csv", type=Path,
                   help="How2Sign re-aligned CSV: extract the clips it names (SENTENCE_NAME) ...")
    p.add_argument("--video-dir", "--video_dir", dest="video_dir", type=Path, help="... from this folder (<name>.mp4)")
    p.add_argument("--signhiera", type=Path, default=DEFAULT_SIGNHIERA,
                   help=f"SignHiera checkpoint (default: {DEFAULT_SIGNHIERA}; sonar-ft download signhiera fetches it)")
    p.add_argument("--out", type=Path, required=True, help="feature folder to write (training's --train_features)")
    p.add_argument("--crop", choices=CROPS, default=d.crop,
                   help="face: box around the signer from face detection (needs dlib-bin); center: largest centred "
                   "square; none: whole frame, for videos already cropped around the signer (default: face)")
    p.add_argument("--batch-size", "--batch_size", dest="batch_size", type=int, default=d.batch_size,
                   help=f"windows per forward pass, across videos (default: {d.batch_size})")
    p.add_argument("--device", default=d.device, help="auto | cpu | cuda | cuda:N (default: auto)")
    p.add_argument("--precision", choices=PRECISIONS, default=d.precision,
                   help="auto = bf16 on GPUs that support it, else fp16; fp32 on the CPU")
    p.add_argument("--workers", type=int, default=d.workers, help=f"videos decoded ahead (default: {d.workers})")
    p.add_argument("--max-minutes", "--max_minutes", dest="max_minutes", type=float, default=d.max_minutes,
                   help=f"refuse longer videos (default: {d.max_minutes:g}; frames are held in memory)")
    p.add_argument("--progress-every", "--progress_every", dest="progress_every", type=float, default=10.0,
                   help="seconds between progress lines (default: 10)")
    p.set_defaults(func=_extract_command)


def _extract_command(args: argparse.Namespace) -> int:
    settings = ExtractSettings(crop=args.crop, batch_size=args.batch_size, device=args.device,
                               precision=args.precision, workers=args.workers, max_minutes=args.max_minutes)
    settings.check()
    jobs = collect_videos(args.videos, list_file=args.list_file, how2sign_csv=args.how2sign_csv, video_dir=args.video_dir)
    inputs = {"--signhiera": args.signhiera, "--list": args.list_file, "--how2sign-csv": args.how2sign_csv,
              "--video-dir": args.video_dir, **{f"video {j.id}": j.path for j in jobs}}
    check_output_not_input(args.out, inputs, out_is_folder=True)
    if args.out.exists() and not args.out.is_dir():
        raise OutputDirError(f"--out {args.out} is a file; give a folder for the feature files")
    model = load_for_extraction(args.signhiera, args.device)
    last = [0.0]

    def progress(summary: ExtractSummary, total: int) -> None:
        now = time.perf_counter()
        finished = len(summary.done) + len(summary.failed) + len(summary.skipped)
        if now - last[0] < args.progress_every and finished < total:
            return
        last[0] = now
        rate = summary.windows_per_second
        left = total - finished
        eta = f", about {left * summary.seconds / len(summary.done) / 60:.1f} min left" if left and summary.done else ""
        print(f"extract: {finished}/{total} videos ({len(summary.failed)} failed), {summary.windows} windows, "
              f"{rate:.2f} windows/s{eta}", flush=True)

    with output_lock(args.out, folder=True, command="sonar-ft extract"):
        summary = extract_videos(model, jobs, args.out, settings=settings, progress=progress,
                                 checkpoint_record=checkpoint_record(args.signhiera))
    print(f"done: {len(summary.done)} extracted, {len(summary.skipped)} already there, {len(summary.failed)} failed "
          f"-> {args.out} ({summary.windows} windows in {summary.seconds:.1f} s, "
          f"{summary.windows_per_second:.2f} windows/s; report: {args.out / REPORT_NAME})")
    for clip_id, reason in list(summary.failed.items())[:10]:
        print(f"  failed {clip_id}: {reason}")
    if len(summary.failed) > 10:
        print(f"  ... and {len(summary.failed) - 10} more (see {args.out / REPORT_NAME})")
    return 1 if summary.failed else 0
