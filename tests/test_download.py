"""``sonar_ft.download`` against a local HTTP server (127.0.0.1, in a thread) that can serve byte
ranges, refuse them, or drop the connection half-way."""

from __future__ import annotations

import hashlib
import http.server
import re
import threading
from pathlib import Path

import pytest

from sonar_ft.cli import main as sonar_ft_cli
from sonar_ft.download import download, part_path
from sonar_ft.errors import ConfigError, DownloadError

PAYLOAD = bytes(range(256)) * 4096  # 1 MiB, every byte value
SHA = hashlib.sha256(PAYLOAD).hexdigest()


class _Handler(http.server.BaseHTTPRequestHandler):
    """Serves PAYLOAD at /file.bin; behaviour set per test on the server object."""

    def log_message(self, *args) -> None:  # keep test output quiet
        pass

    def _send(self, head_only: bool) -> None:
        server = self.server
        server.requests.append(dict(self.headers))
        if self.path != "/file.bin":
            self.send_error(404)
            return
        start = 0
        match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))
        if match and server.ranges:
            start = int(match.group(1))
            if start >= len(PAYLOAD):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(PAYLOAD)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(PAYLOAD) - 1}/{len(PAYLOAD)}")
        else:
            self.send_response(200)
        body = PAYLOAD[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if head_only:
            return
        if server.cut_after is not None:  # promise everything, send part, hang up
            self.wfile.write(body[: server.cut_after])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)

    def do_GET(self) -> None:
        self._send(head_only=False)

    def do_HEAD(self) -> None:
        self._send(head_only=True)


@pytest.fixture
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.ranges, httpd.cut_after, httpd.requests = True, None, []
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    httpd.url = f"http://127.0.0.1:{httpd.server_address[1]}/file.bin"
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def test_full_download_is_verified_and_renamed_into_place(server, tmp_path):
    dest = download(server.url, tmp_path / "f.bin", sha256=SHA, progress=False)
    assert dest.read_bytes() == PAYLOAD and not part_path(dest).exists()


def test_partial_download_resumes_with_a_range_request(server, tmp_path):
    dest = tmp_path / "f.bin"
    part_path(dest).write_bytes(PAYLOAD[:300_000])
    download(server.url, dest, sha256=SHA, progress=False)
    assert dest.read_bytes() == PAYLOAD
    assert server.requests[-1].get("Range") == "bytes=300000-"


def test_resume_starts_over_when_the_server_ignores_ranges(server, tmp_path):
    server.ranges = False
    dest = tmp_path / "f.bin"
    part_path(dest).write_bytes(b"\xff" * 1000)  # not even the right bytes: must not be kept
    download(server.url, dest, sha256=SHA, progress=False)
    assert dest.read_bytes() == PAYLOAD


def test_complete_part_is_finished_without_new_bytes(server, tmp_path):
    dest = tmp_path / "f.bin"
    part_path(dest).write_bytes(PAYLOAD)  # killed between the last byte and the rename
    download(server.url, dest, sha256=SHA, progress=False)
    assert dest.read_bytes() == PAYLOAD


def test_dropped_connection_keeps_the_part_and_the_next_run_resumes(server, tmp_path):
    dest = tmp_path / "f.bin"
    server.cut_after = 400_000
    with pytest.raises(DownloadError, match=r"stopped after 400000 of 1048576 bytes.*run the same command again"):
        download(server.url, dest, progress=False)
    assert not dest.exists() and part_path(dest).stat().st_size == 400_000
    server.cut_after = None
    download(server.url, dest, sha256=SHA, progress=False)
    assert dest.read_bytes() == PAYLOAD and server.requests[-1].get("Range") == "bytes=400000-"


def test_size_mismatch_is_an_error_and_writes_nothing(server, tmp_path):
    dest = tmp_path / "f.bin"
    with pytest.raises(DownloadError, match=rf"is {len(PAYLOAD)} bytes but --size says {len(PAYLOAD) + 1}"):
        download(server.url, dest, expected_size=len(PAYLOAD) + 1, progress=False)
    assert not dest.exists()


def test_sha256_mismatch_is_an_error_and_writes_nothing(server, tmp_path):
    dest = tmp_path / "f.bin"
    wrong = "0" * 64
    with pytest.raises(DownloadError, match=rf"SHA-256 is {SHA}, expected {wrong}"):
        download(server.url, dest, sha256=wrong, progress=False)
    assert not dest.exists() and not part_path(dest).exists()  # a corrupt part is not resumed


def test_existing_complete_file_is_not_downloaded_again(server, tmp_path):
    dest = tmp_path / "f.bin"
    dest.write_bytes(PAYLOAD)
    download(server.url, dest, sha256=SHA, progress=False)
    assert server.requests == []


def test_existing_file_of_the_wrong_size_is_replaced(server, tmp_path):
    dest = tmp_path / "f.bin"
    dest.write_bytes(PAYLOAD[:10])
    download(server.url, dest, progress=False)  # no size given: the server's Content-Length decides
    assert dest.read_bytes() == PAYLOAD


def test_http_error_names_the_url(server, tmp_path):
    with pytest.raises(DownloadError, match=r"/missing.bin failed: HTTP 404"):
        download(server.url.replace("file.bin", "missing.bin"), tmp_path / "f.bin", progress=False)


@pytest.mark.parametrize("url", ["file:///etc/passwd", "ftp://example.org/x", "/local/path"])
def test_only_http_urls_are_fetched(tmp_path, url):
    with pytest.raises(ConfigError, match="must start with http:// or https://"):
        download(url, tmp_path / "f.bin", progress=False)


def test_cli_downloads_into_a_folder(server, tmp_path, capsys):
    assert sonar_ft_cli(["download", server.url, "--out", str(tmp_path), "--sha256", SHA]) == 0
    assert (tmp_path / "file.bin").read_bytes() == PAYLOAD
    assert str(tmp_path / "file.bin") in capsys.readouterr().out


def test_cli_sha256_mismatch_is_one_error_line(server, tmp_path, capsys):
    code = sonar_ft_cli(["download", server.url, "--out", str(tmp_path / "f.bin"), "--sha256", "1" * 64])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert code == 2 and len(errors) == 1 and "SHA-256" in errors[0] and "Traceback" not in err
    assert not (tmp_path / "f.bin").exists()


def test_cli_size_mismatch_is_one_error_line(server, tmp_path, capsys):
    code = sonar_ft_cli(["download", server.url, "--out", str(tmp_path / "f.bin"), "--size", "12"])
    err = capsys.readouterr().err
    assert code == 2 and "--size says 12" in err and "Traceback" not in err
    assert not (tmp_path / "f.bin").exists()


def test_cli_knows_the_signhiera_file_by_name(monkeypatch, tmp_path, capsys):
    from sonar_ft import download as download_module

    asked = {}

    def fake(url, dest, **kwargs):
        asked["url"] = url
        Path(dest).write_bytes(b"x")
        return Path(dest)

    monkeypatch.setattr(download_module, "download", fake)
    assert sonar_ft_cli(["download", "signhiera", "--out", str(tmp_path)]) == 0
    assert asked["url"] == "https://dl.fbaipublicfiles.com/SONAR/asl/dm_70h_ub_signhiera.pth"
    assert (tmp_path / "dm_70h_ub_signhiera.pth").exists()
