"""Video -> SignHiera input: decode (PyAV), crop around the signer, sample 128-frame windows, normalise.

What the SONAR ASL encoder was trained on, as ssvp_slt prepares a single video:

- **Windows**: 128 frames sampled evenly over ``2 * 128 / 25 * fps`` raw frames (10.24 s), a new window
  every 128 raw frames; past the end, indices are clamped to the last frame, and the repeated frames
  are the window's *padding* (frames that add nothing new). Windows overlap; their vectors are simply
  concatenated by the caller (64 per window, minus ``padding // 2`` for the last one).
- **Crop** (one box for the whole video, made square, padded black, resized to 224 x 224):
  ``face``: faces found on every 16th frame, each box widened by 1.5x the face width left and right,
  1.0x its height up and 3.0x down; their mean when there is one face, the most moving face track when
  there are several, the reference's centre box when there is none.  ``center``: the largest centred
  square.  ``none``: the whole frame (for datasets already cropped around the signer).
- **Pixels**: RGB / 255, minus 0.45, divided by 0.225 on every channel, laid out (3, T, H, W).

Faces are found with dlib's HOG detector (the reference's default), from the optional ``dlib-bin``
package; the resize is bilinear with OpenCV's pixel-centre convention, written in numpy. Videos that
cannot be used (corrupt, no video stream, no or one frame, huge resolution, variable frame rate, too
long) raise :class:`~sonar_ft.errors.VideoError` naming the file and what to do.

This module imports no torch: windows are numpy arrays the caller moves to its device.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

from sonar_ft.errors import VideoError

logger = logging.getLogger(__name__)

WINDOW_FRAMES = 128
"""Frames in one SignHiera window."""
SAMPLING_RATE = 2
"""Raw frames per sampled frame at the target frame rate."""
TARGET_FPS = 25.0
"""Frame rate the model was trained at: a window spans SAMPLING_RATE * WINDOW_FRAMES / TARGET_FPS = 10.24 s."""
WINDOW_STEP = 128
"""Raw frames between the starts of two windows (the reference's stride 64 x sampling rate 2)."""
CROP_SIZE = 224
MEAN = 0.45
STD = 0.225
CROPS: tuple[str, ...] = ("face", "center", "none")
"""The ``--crop`` choices."""

FACE_EXPAND = {"left": 1.5, "up": 1.0, "right": 1.5, "down": 3.0}
"""How far a face box is widened, in face widths (left, right) and heights (up, down)."""
DETECT_EVERY = 16
"""Faces are looked for on every this-many-th frame."""
TRACK_IOU = 0.2
TRACK_MIN_SHARE = 0.5

MAX_PIXELS = 4096 * 4096
"""Larger frames are refused (decoding them at full size would take gigabytes per second of video)."""
DEFAULT_MAX_MINUTES = 15.0
"""Longer videos are refused by default: cropped frames are kept in memory (~150 KB each)."""
MIN_FRAMES = 2
VFR_TOLERANCE = 0.25
"""A frame whose duration differs from the median by more than this share counts as irregular..."""
VFR_MAX_SHARE = 0.05
"""...and a video with more than this share of irregular frames has a variable frame rate."""

Box = tuple[float, float, float, float]
"""(x0, y0, x1, y1) in source pixels."""
FaceDetector = Callable[[np.ndarray], list[Box]]
"""RGB frame (H, W, 3) uint8 -> face boxes in that frame's pixels."""


# --------------------------------------------------------------------------------------------
# Windows
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Window:
    """One window: which raw frames it samples, and how many of its frames are padding."""

    start: int
    indices: np.ndarray  # (WINDOW_FRAMES,) int64, raw frame index of each sampled frame
    padding: int


def window_plan(num_frames: int, fps: float) -> list[Window]:
    """The windows of a video of ``num_frames`` frames at ``fps``, as the reference samples them.

    Window ``k`` starts at raw frame ``128 k`` and takes 128 frames evenly spaced (at half-frame
    offsets) over ``2 * 128 / 25 * fps`` raw frames; indices past the end repeat the last frame. The
    last window is the first that reaches the end. Padding counts sampled frames that repeat an
    earlier one (at under 12.5 fps the duplicates that up-sampling creates do not count).
    """
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    if not fps > 0:
        raise ValueError(f"fps must be > 0, got {fps}")
    span = SAMPLING_RATE * WINDOW_FRAMES / TARGET_FPS * fps  # raw frames one window covers
    step = (span - 1) / (WINDOW_FRAMES - 1)
    offsets = np.arange(WINDOW_FRAMES) * step + 0.5
    windows = []
    for start in range(0, num_frames, WINDOW_STEP):
        indices = np.minimum(np.floor(start + offsets), num_frames - 1).astype(np.int64)
        unique = len(np.unique(indices))
        if TARGET_FPS > fps * SAMPLING_RATE:  # up-sampled: repeated frames are content, not padding
            unique = math.floor(unique * TARGET_FPS / (fps * SAMPLING_RATE))
        windows.append(Window(start, indices, max(0, WINDOW_FRAMES - unique)))
        if start + span - 1 >= num_frames:
            break
    return windows


def normalise(frames: np.ndarray) -> np.ndarray:
    """uint8 frames (..., T, H, W, 3) -> float32 (..., 3, T, H, W): x / 255, minus MEAN, divided by STD."""
    x = frames.astype(np.float32)
    x *= 1.0 / (255.0 * STD)
    x -= MEAN / STD
    return np.moveaxis(x, -1, -4)


# --------------------------------------------------------------------------------------------
# Geometry
# --------------------------------------------------------------------------------------------


def square_box(box: Box) -> tuple[int, int, int, int]:
    """Grow the shorter side of ``box`` equally on both ends to make it square; truncate to integers."""
    x0, y0, x1, y1 = box
    grow = abs((x1 - x0) - (y1 - y0)) / 2
    if x1 - x0 < y1 - y0:
        x0, x1 = x0 - grow, x1 + grow
    else:
        y0, y1 = y0 - grow, y1 + grow
    return int(x0), int(y0), int(x1), int(y1)  # int(): towards zero, as the reference


def center_box(width: int, height: int) -> Box:
    """The largest centred square (``--crop center``)."""
    side = min(width, height)
    x0, y0 = (width - side) // 2, (height - side) // 2
    return (x0, y0, x0 + side, y0 + side)


def full_box(width: int, height: int) -> Box:
    """The whole frame (``--crop none``); :func:`square_box` pads it to a square."""
    return (0, 0, width, height)


def fallback_face_box(width: int, height: int) -> Box:
    """The reference's box when no face is found: centred, half the shorter side."""
    cx, cy, size = width // 2, height // 2, min(width, height) // 2
    return (cx - size // 2, cy - size // 2, cx + size // 2, cy + size // 2)


def _axis(n_out: int, start: int, length: int, n_src: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Bilinear sampling of ``length`` source pixels from ``start`` onto ``n_out`` (OpenCV's pixel centres).

    Returns the two source indices per output pixel (clamped into the frame), their weights' second
    term, and whether each source index lies inside the frame (outside is black).
    """
    pos = (np.arange(n_out, dtype=np.float64) + 0.5) * (length / n_out) - 0.5
    pos = np.clip(pos, 0, length - 1)
    lo = np.floor(pos).astype(np.int64)
    hi = np.minimum(lo + 1, length - 1)
    frac = (pos - lo).astype(np.float32)
    lo, hi = lo + start, hi + start
    inside_lo = (lo >= 0) & (lo < n_src)
    inside_hi = (hi >= 0) & (hi < n_src)
    return np.clip(lo, 0, n_src - 1), np.clip(hi, 0, n_src - 1), frac, np.stack([inside_lo, inside_hi])


def crop_resize(frame: np.ndarray, box: tuple[int, int, int, int], size: int | tuple[int, int] = CROP_SIZE) -> np.ndarray:
    """Crop ``frame`` (H, W, C) uint8 to ``box`` (black outside the frame) and resize it bilinearly to ``size``."""
    out_h, out_w = (size, size) if isinstance(size, int) else size
    x0, y0, x1, y1 = box
    h, w = frame.shape[:2]
    ylo, yhi, fy, yin = _axis(out_h, y0, y1 - y0, h)
    xlo, xhi, fx, xin = _axis(out_w, x0, x1 - x0, w)
    f = frame.astype(np.float32)

    def take(rows: np.ndarray, cols: np.ndarray, row_in: np.ndarray, col_in: np.ndarray) -> np.ndarray:
        values = f[rows[:, None], cols[None, :]]
        return values * (row_in[:, None] & col_in[None, :])[..., None]

    fx_ = fx[None, :, None]
    top = take(ylo, xlo, yin[0], xin[0]) * (1 - fx_) + take(ylo, xhi, yin[0], xin[1]) * fx_
    bottom = take(yhi, xlo, yin[1], xin[0]) * (1 - fx_) + take(yhi, xhi, yin[1], xin[1]) * fx_
    fy_ = fy[:, None, None]
    out = top * (1 - fy_) + bottom * fy_
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def to_gray(frame: np.ndarray) -> np.ndarray:
    """RGB (H, W, 3) uint8 -> luma (H, W) uint8 (ITU-R BT.601 weights, as OpenCV)."""
    g = frame[..., 0] * 0.299 + frame[..., 1] * 0.587 + frame[..., 2] * 0.114
    return np.rint(g).astype(np.uint8)


# --------------------------------------------------------------------------------------------
# Faces
# --------------------------------------------------------------------------------------------


def detection_scale(width: int) -> float:
    """How much the reference shrinks a frame before looking for faces (1/4 above 960 pixels wide)."""
    if width > 960:
        return 1 / 4
    if width == 960:
        return 1 / 6
    return 1 / 2


def dlib_face_detector() -> FaceDetector:
    """dlib's HOG frontal-face detector (needs the ``dlib-bin`` package), on a shrunken grey frame."""
    try:
        import dlib
    except ImportError:
        raise VideoError(
            "--crop face needs dlib's face detector: pip install dlib-bin (see requirements.txt), or use "
            "--crop center (largest centred square) or --crop none (videos already cropped around the signer)"
        ) from None
    hog = dlib.get_frontal_face_detector()

    def detect(frame: np.ndarray) -> list[Box]:
        h, w = frame.shape[:2]
        scale = detection_scale(w)
        small = crop_resize(frame, (0, 0, w, h), (max(1, round(h * scale)), max(1, round(w * scale))))
        return [(r.left() // scale, r.top() // scale, r.right() // scale, r.bottom() // scale)
                for r in hog(to_gray(small), 1)]

    return detect


def expand_face(box: Box) -> Box:
    """Widen a face box to take in the signing space (hands, torso)."""
    x0, y0, x1, y1 = box
    w, h = x1 - x0 + 1, y1 - y0 + 1
    return (x0 - w * FACE_EXPAND["left"], y0 - h * FACE_EXPAND["up"],
            x1 + w * FACE_EXPAND["right"], y1 + h * FACE_EXPAND["down"])


def _iou(a: Box, b: Box) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]) + 1)
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]) + 1)
    inter = ix * iy
    area = lambda r: (r[2] - r[0] + 1) * (r[3] - r[1] + 1)  # noqa: E731
    return inter / float(area(a) + area(b) - inter)


def face_box(faces: Sequence[Sequence[Box]], motion: Sequence[np.ndarray], width: int, height: int) -> Box:
    """One crop box from the faces found on the sampled frames (each already :func:`expand_face`-ed).

    One face at most per frame: the mean of the frames' boxes. None: :func:`fallback_face_box`.
    Several: faces are linked across frames into tracks (IoU > 0.2); among the tracks seen on more
    than half of the frames, the one with the most motion inside it (mean absolute frame difference,
    a cheap stand-in for the reference's optical flow), else the largest track; its mean box.
    """
    most = max((len(f) for f in faces), default=0)
    if most == 0:
        return fallback_face_box(width, height)
    if most == 1:
        return tuple(np.mean([f[0] for f in faces if len(f) == 1], axis=0).tolist())  # type: ignore[return-value]
    left = [list(f) for f in faces]
    tracks: list[list[tuple[int, Box]]] = []
    while any(left):
        i = next(i for i, f in enumerate(left) if f)
        anchor = left[i].pop()
        track = [(i, anchor)]
        for j, boxes in enumerate(left):
            if j == i or not boxes:
                continue
            ious = [_iou(anchor, b) for b in boxes]
            best = int(np.argmax(ious))
            if ious[best] > TRACK_IOU:
                track.append((j, boxes.pop(best)))
        tracks.append(track)

    def moving(track: list[tuple[int, Box]]) -> float:
        values = []
        for j, (x0, y0, x1, y1) in track:
            m = motion[j]
            values.append(float(m[max(int(y0), 0): max(int(y1), 0), max(int(x0), 0): max(int(x1), 0)].mean())
                          if m.size and int(y1) > max(int(y0), 0) and int(x1) > max(int(x0), 0) else 0.0)
        return float(np.mean(values))

    frequent = [t for t in tracks if len(t) / len(faces) > TRACK_MIN_SHARE]
    if frequent:
        chosen = max(frequent, key=moving)
    else:
        chosen = max(tracks, key=lambda t: sum((b[2] - b[0]) * (b[3] - b[1]) for _, b in t))
    return tuple(np.mean([b for _, b in chosen], axis=0).tolist())  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------------------------


@dataclass
class VideoInfo:
    """What the report says of a video."""

    path: Path
    frames: int
    fps: float
    width: int
    height: int
    codec: str

    @property
    def seconds(self) -> float:
        return self.frames / self.fps


@dataclass
class DecodedVideo:
    """A video's frames cropped around the signer, ready to be cut into windows."""

    info: VideoInfo
    frames: np.ndarray  # (N, size, size, 3) uint8
    crop: str
    crop_box: tuple[int, int, int, int]  # square, in source pixels; may reach outside the frame
    faces_found: int | None = None  # sampled frames with a face (``--crop face`` only)
    windows: list[Window] = field(default_factory=list)

    def window(self, w: Window) -> np.ndarray:
        """The uint8 frames (128, size, size, 3) of one window."""
        return self.frames[w.indices]


def _open(path: Path) -> Any:
    import av

    if not path.is_file():
        raise VideoError(f"video not found: {path}")
    if path.stat().st_size == 0:
        raise VideoError(f"video {path} is empty (0 bytes); copy it again")
    try:
        container = av.open(str(path))
    except (av.FFmpegError, OSError, UnicodeDecodeError) as exc:
        raise VideoError(f"cannot open video {path}: {exc}. The file is corrupt or not a video; copy or "
                         "re-encode it (ffmpeg -i IN -c:v libx264 OUT.mp4)") from None
    if not container.streams.video:
        kinds = ", ".join(sorted({s.type for s in container.streams})) or "no streams"
        container.close()
        raise VideoError(f"{path} has no video stream ({kinds}): it is not a video of a signer")
    return container


def _frame_rate(stream: Any) -> Fraction | None:
    for rate in (stream.average_rate, stream.guessed_rate, stream.base_rate):
        if rate and rate > 0:
            return Fraction(rate)
    return None


def probe(path: str | Path, *, max_pixels: int = MAX_PIXELS) -> tuple[int, int, float, str]:
    """Width, height, frame rate and codec of ``path``'s video stream (no frame decoded)."""
    path = Path(path)
    container = _open(path)
    try:
        stream = container.streams.video[0]
        width, height = stream.codec_context.width, stream.codec_context.height
        rate = _frame_rate(stream)
        codec = stream.codec_context.name
    finally:
        container.close()
    if width * height > max_pixels:
        raise VideoError(f"{path} is {width}x{height}, more than the {max_pixels:,} pixels per frame accepted; "
                         f"scale it down first (ffmpeg -i IN -vf scale=-2:720 OUT.mp4)")
    if rate is None:
        raise VideoError(f"{path} declares no frame rate; re-encode it at a constant rate "
                         "(ffmpeg -i IN -vf fps=25 OUT.mp4)")
    return width, height, float(rate), codec


def _frames(path: Path, max_frames: int) -> Iterator[tuple[int, Any]]:
    """(index, av.VideoFrame) of every frame, checking that the stream decodes and has a constant rate."""
    import av

    container = _open(path)
    times: list[float] = []
    try:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        i = -1
        try:
            for i, frame in enumerate(container.decode(stream)):
                if i >= max_frames:
                    raise VideoError(f"{path} is longer than the {max_frames} frames accepted; cut it into clips "
                                     "(ffmpeg -ss START -t SECONDS) or raise --max-minutes")
                if frame.time is not None:
                    times.append(frame.time)
                yield i, frame
        except av.FFmpegError as exc:
            raise VideoError(f"video {path} is corrupt after {i + 1} frames ({exc}); re-encode or copy it again") from None
    finally:
        container.close()
    _check_constant_rate(path, times)


def _check_constant_rate(path: Path, times: list[float]) -> None:
    if len(times) < 3:
        return
    durations = np.diff(np.sort(np.asarray(times)))
    median = float(np.median(durations))
    if median <= 0:
        return
    irregular = float(np.mean(np.abs(durations - median) > VFR_TOLERANCE * median))
    if irregular > VFR_MAX_SHARE:
        raise VideoError(
            f"{path} has a variable frame rate ({irregular:.0%} of its frames last more or less than the usual "
            f"{median * 1000:.1f} ms): windows would not span 10.24 s. Re-encode it at a constant rate first "
            "(ffmpeg -i IN -vf fps=25 OUT.mp4)"
        )


def read_video(
    path: str | Path,
    *,
    crop: str = "face",
    size: int = CROP_SIZE,
    detector: FaceDetector | None = None,
    max_pixels: int = MAX_PIXELS,
    max_minutes: float = DEFAULT_MAX_MINUTES,
) -> DecodedVideo:
    """Decode ``path``, crop every frame to one square box around the signer, and plan its windows.

    ``crop``: ``face`` | ``center`` | ``none`` (see the module doc); ``detector`` replaces dlib for
    ``face``. Raises :class:`VideoError` naming the file for every video that cannot be used.
    """
    path = Path(path)
    if crop not in CROPS:
        raise VideoError(f"unknown crop {crop!r}: use one of {', '.join(CROPS)}")
    width, height, fps, codec = probe(path, max_pixels=max_pixels)
    max_frames = max(MIN_FRAMES, int(max_minutes * 60 * fps) + 1)

    faces_found = None
    if crop == "face":
        detect = detector or dlib_face_detector()
        faces: list[list[Box]] = []
        motion: list[np.ndarray] = []
        previous = None
        for i, frame in _frames(path, max_frames):
            if i % DETECT_EVERY == 0 or i % DETECT_EVERY == DETECT_EVERY - 1:
                rgb = frame.to_ndarray(format="rgb24")
                if i % DETECT_EVERY == DETECT_EVERY - 1:
                    previous = to_gray(rgb)
                    continue
                gray = to_gray(rgb)
                diff = np.abs(gray.astype(np.int16) - previous) if previous is not None else np.zeros_like(gray, np.int16)
                span = max(int(diff.max()) - int(diff.min()), 1)
                motion.append(((diff - diff.min()) * (255.0 / span)).astype(np.float32))
                faces.append([expand_face(b) for b in detect(rgb)])
        faces_found = sum(1 for f in faces if f)
        box = face_box(faces, motion, width, height)
    else:
        box = center_box(width, height) if crop == "center" else full_box(width, height)
    square = square_box(box)

    frames = []
    for _, frame in _frames(path, max_frames):
        frames.append(crop_resize(frame.to_ndarray(format="rgb24"), square, size))
    if not frames:
        raise VideoError(f"{path} has no frames that decode (0 frames); copy or re-encode it")
    if len(frames) < MIN_FRAMES:
        raise VideoError(f"{path} has only {len(frames)} frame: a still image, not a video of signing")
    info = VideoInfo(path=path, frames=len(frames), fps=fps, width=width, height=height, codec=codec)
    video = DecodedVideo(info=info, frames=np.stack(frames), crop=crop, crop_box=square, faces_found=faces_found)
    video.windows = window_plan(info.frames, fps)
    return video


# --------------------------------------------------------------------------------------------
# Synthetic videos (tests, demo)
# --------------------------------------------------------------------------------------------


_FORMATS = {".mkv": "matroska", ".mp4": "mp4", ".mov": "mov", ".avi": "avi", ".webm": "webm"}


def write_synthetic_video(
    path: str | Path,
    frames: int,
    *,
    fps: int | Fraction = 25,
    width: int = 96,
    height: int = 64,
    seed: int = 0,
    codec: str = "mpeg4",
    pts: Sequence[int] | None = None,
) -> Path:
    """Write a small moving-pattern video (an mp4 / mkv PyAV can decode); returns ``path``.

    Each frame differs (a bar moves, colours drift), so repeated frames are recognisable.
    ``pts`` (in units of 1 / (fps * 100)) sets irregular timestamps for variable-frame-rate tests.
    Written to a temporary name and renamed, like every file the project writes.
    """
    import av

    from sonar_ft.files import atomic

    path = Path(path)
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, size=(3,), dtype=np.int64)
    with atomic.atomic_path(path) as tmp:
        container_format = _FORMATS.get(path.suffix.lower(), path.suffix.lstrip("."))
        with av.open(str(tmp), mode="w", format=container_format) as out:
            stream = out.add_stream(codec, rate=fps)
            stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
            if pts is not None:
                stream.codec_context.time_base = Fraction(1, int(fps) * 100)
            if frames == 0:
                out.start_encoding()  # a header with a video stream and no frame in it
            for i in range(frames):
                img = np.empty((height, width, 3), np.uint8)
                img[...] = ((base + 7 * i + np.arange(3) * 50) % 256).astype(np.uint8)
                x = (i * 3) % width
                img[:, x: x + 6] = 255 - img[:, x: x + 6]
                frame = av.VideoFrame.from_ndarray(img, format="rgb24")
                if pts is not None:
                    frame.pts = int(pts[i])
                    frame.time_base = stream.codec_context.time_base
                for packet in stream.encode(frame):
                    out.mux(packet)
            for packet in stream.encode():
                out.mux(packet)
    return path
