"""``sonar-ft download``: fetch one file (a checkpoint, a feature archive) safely and resumably.

Only the URL given is fetched (HTTP redirects are followed, to http/https only). Bytes go to
``DEST.part``; a stopped download resumes from there with an HTTP ``Range`` request when the
server supports it (else it starts over). The file is renamed to ``DEST`` only after its size
(``--size`` or the server's ``Content-Length``) and, when given, its SHA-256 match, so a file
at ``DEST`` is always complete. A ``DEST`` already there with the right size / hash is kept.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import logging
import re
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import BinaryIO


from sonar_ft.progress import Progress
from sonar_ft.errors import ConfigError, DownloadError
from sonar_ft.files.atomic import commit_file

log = logging.getLogger(__name__)

CHUNK = 1 << 20
PART_SUFFIX = ".part"
KNOWN_FILES: dict[str, tuple[str, str]] = {
    "signhiera": (
        "https://dl.fbaipublicfiles.com/SONAR/asl/dm_70h_ub_signhiera.pth",
        "SignHiera video model whose features the SONAR ASL encoder reads (sonar-ft extract); licence CC-BY-NC 4.0",
    ),
}
"""Files ``sonar-ft download NAME`` knows by name: NAME -> (URL, what it is). Their SHA-256 is not published;
``sonar-ft extract`` records the one of the file it used."""

_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")
_UNSATISFIED_RANGE = re.compile(r"bytes \*/(\d+)")


class _HttpOnlyRedirects(urllib.request.HTTPRedirectHandler):
    """Follow redirects, but only to http(s) URLs (urllib's default would also follow ftp://)."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # noqa: D102 (urllib's signature)
        if urllib.parse.urlsplit(newurl).scheme.lower() not in ("http", "https"):
            raise urllib.error.HTTPError(newurl, code, f"refusing a redirect to {newurl}", headers, fp)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


_OPENER = urllib.request.build_opener(_HttpOnlyRedirects)


def part_path(dest: Path) -> Path:
    """Where the bytes of ``dest`` accumulate until they are verified."""
    return dest.with_name(dest.name + PART_SUFFIX)


def _sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _check_url(url: str) -> None:
    scheme = urllib.parse.urlsplit(url).scheme.lower()
    if scheme not in ("http", "https"):
        raise ConfigError(f"download URL {url!r} must start with http:// or https://")


def _open(url: str, offset: int, timeout: float):
    headers = {"User-Agent": "sonar-ft", "Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        return _OPENER.open(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and offset:
            return exc  # the part may already hold every byte; the caller checks
        raise DownloadError(f"downloading {url} failed: HTTP {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise DownloadError(f"cannot reach {url}: {reason}. Check the URL and the network, then run again") from None


def _remote_size(url: str, timeout: float) -> int | None:
    """``Content-Length`` from a HEAD request, or None when the server does not say."""
    try:
        with _OPENER.open(urllib.request.Request(url, method="HEAD", headers={"User-Agent": "sonar-ft"}),
                          timeout=timeout) as resp:
            length = resp.headers.get("Content-Length")
    except (urllib.error.URLError, OSError):
        return None
    return int(length) if length and length.isdigit() else None


def _verify(path: Path, size: int | None, sha256: str | None) -> str | None:
    """Why ``path`` is not the file asked for, or None when it is."""
    actual = path.stat().st_size
    if size is not None and actual != size:
        return f"it has {actual} bytes, expected {size}"
    if sha256 is not None:
        digest = _sha256_of(path)
        if digest != sha256.lower():
            return f"its SHA-256 is {digest}, expected {sha256.lower()}"
    return None


def download(
    url: str,
    dest: str | Path,
    *,
    expected_size: int | None = None,
    sha256: str | None = None,
    resume: bool = True,
    timeout: float = 60.0,
    progress: bool = True,
) -> Path:
    """Download ``url`` to ``dest`` (atomically, verified, resumable) and return ``dest``.

    Raises :class:`DownloadError` naming the URL / file when the server fails or the result's
    size or SHA-256 differs from what was expected; ``dest`` is then left untouched. An
    incomplete ``dest.part`` is kept so that running again resumes it.
    """
    _check_url(url)
    dest = Path(dest)
    if sha256 is not None and not re.fullmatch(r"[0-9a-fA-F]{64}", sha256):
        raise ConfigError(f"--sha256 must be 64 hexadecimal digits (got {sha256!r})")
    if expected_size is not None and expected_size < 0:
        raise ConfigError(f"--size must be >= 0 (got {expected_size})")
    dest.parent.mkdir(parents=True, exist_ok=True)

    if dest.is_file():
        size = expected_size if expected_size is not None or sha256 is not None else _remote_size(url, timeout)
        problem = _verify(dest, size, sha256)
        if problem is None:
            log.info("%s is already there and complete: not downloading it again", dest)
            return dest
        log.warning("%s is there but %s: downloading it again", dest, problem)

    part = part_path(dest)
    offset = part.stat().st_size if resume and part.is_file() else 0
    total = _fetch(url, part, offset, expected_size, timeout, desc=dest.name, progress=progress)
    if total is not None and part.stat().st_size < total:
        raise DownloadError(
            f"download of {url} stopped after {part.stat().st_size} of {total} bytes; run the same command again "
            f"to resume ({part} is kept)"
        )
    problem = _verify(part, total, sha256)
    if problem is not None:
        part.unlink()
        raise DownloadError(f"the file downloaded from {url} is not the one expected: {problem}. Nothing was written "
                            f"to {dest}; check the URL, --size and --sha256")
    commit_file(part, dest)
    log.info("downloaded %s (%d bytes)", dest, dest.stat().st_size)
    return dest


def _fetch(url: str, part: Path, offset: int, expected_size: int | None, timeout: float, *, desc: str, progress: bool) -> int | None:
    """Write (or append to) ``part`` from ``url``; return the file's full size when known."""
    total = expected_size
    resp = _open(url, offset, timeout)
    with resp:
        status = getattr(resp, "status", None) or resp.getcode()
        if status == 416:
            # Nothing after `offset`: complete only if the server's size says so; else start over.
            match = _UNSATISFIED_RANGE.match(resp.headers.get("Content-Range", ""))
            size = total if total is not None else (int(match.group(1)) if match else None)
            if size is not None and size == offset:
                return size
            log.info("%s is longer than the file at %s: starting again", part, url)
            return _fetch(url, part, 0, expected_size, timeout, desc=desc, progress=progress)
        if offset and status == 206:
            match = _CONTENT_RANGE.match(resp.headers.get("Content-Range", ""))
            if not match or int(match.group(1)) != offset:
                raise DownloadError(f"{url}: the server answered a resume request with the wrong range "
                                    f"({resp.headers.get('Content-Range')!r}); delete {part} and run again")
            server_total = int(match.group(3)) if match.group(3) != "*" else None
            mode = "ab"
            log.info("resuming %s at byte %d", part, offset)
        else:
            if offset:
                log.info("%s does not support resuming: downloading it from the start", url)
            offset = 0
            length = resp.headers.get("Content-Length")
            server_total = int(length) if length and length.isdigit() else None
            mode = "wb"
        if total is not None and server_total is not None and server_total != total:
            raise DownloadError(f"{url} is {server_total} bytes but --size says {total}; nothing was written to "
                                f"{desc}. Check the URL and --size")
        total = total if total is not None else server_total
        with open(part, mode) as out:
            _copy(resp, out, total=total, initial=offset, desc=desc, progress=progress)
    return total


def _copy(src: BinaryIO, dst: BinaryIO, *, total: int | None, initial: int, desc: str, progress: bool) -> None:
    with Progress(total, initial=initial, unit="B", desc=desc, enabled=progress) as bar:
        while True:
            try:
                chunk = src.read(CHUNK)
            except (OSError, http.client.HTTPException) as exc:  # reset, timed out, cut short: what arrived is kept
                log.warning("connection lost: %s", exc)
                return
            if not chunk:
                return
            dst.write(chunk)
            bar.update(len(chunk))


# ------------------------------------------------------------------------------------------------
# Command
# ------------------------------------------------------------------------------------------------
def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``download`` to the ``sonar-ft`` command."""
    p = subparsers.add_parser(
        "download",
        help="download one file safely (resumable, size / SHA-256 checked, written atomically)",
        description="Download URL to --out. Bytes go to OUT.part (resumed on the next run when the server "
        "supports it); OUT appears only once the size (and --sha256 when given) match.",
    )
    known = ", ".join(f"{name} ({what})" for name, (_, what) in KNOWN_FILES.items())
    p.add_argument("url", help=f"http(s) URL of the file (only this URL is fetched), or a known name: {known}")
    p.add_argument("--out", required=True, type=Path, help="file to write (an existing folder: the URL's file name in it)")
    p.add_argument("--sha256", help="expected SHA-256 (64 hex digits); a mismatch is an error")
    p.add_argument("--size", type=int, help="expected size in bytes (default: the server's Content-Length)")
    p.add_argument("--no-resume", "--no_resume", dest="resume", action="store_false", help="ignore an earlier OUT.part")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the server (default 60)")
    p.set_defaults(func=_download_command)


def _download_command(args: argparse.Namespace) -> int:
    if args.url in KNOWN_FILES:
        args.url = KNOWN_FILES[args.url][0]
    out: Path = args.out
    if out.is_dir():
        name = Path(urllib.parse.unquote(urllib.parse.urlsplit(args.url).path)).name
        if not name:
            raise ConfigError(f"--out {out} is a folder and the URL {args.url} names no file; give a file path")
        out = out / name
    path = download(args.url, out, expected_size=args.size, sha256=args.sha256, resume=args.resume, timeout=args.timeout)
    print(f"{path} ({path.stat().st_size} bytes)")
    return 0
