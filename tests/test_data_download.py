"""`tiger download` against a local HTTP server on 127.0.0.1 serving files the test generates."""

from __future__ import annotations

import functools
import http.server
import threading

import pytest

from tiger_ray import cli
from tiger_ray.data import cli as data_cli
from tiger_ray.data.download import DownloadError, download_file, download_mcauley
from tiger_ray.data.prepare import PrepareConfig, run_prepare
from tiger_ray.runs import RunDir
from test_data_mcauley import write_mcauley_files  # tests/ is on sys.path (no __init__.py)

PROXY_VARIABLES = ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY")


class FixtureHandler(http.server.SimpleHTTPRequestHandler):
    """Serves a folder; /truncated/<name> promises more bytes than it sends."""

    def do_GET(self):
        if self.path.startswith("/truncated/"):
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            self.wfile.write(b"only ten b")
            self.close_connection = True
            return
        super().do_GET()

    def log_message(self, *args):  # keep the test output quiet
        pass


@pytest.fixture
def server(tmp_path, monkeypatch):
    """An HTTP server bound to 127.0.0.1 only, on a free port, stopped after the test."""
    for name in PROXY_VARIABLES:  # talk to the loopback server directly, never via a proxy
        monkeypatch.delenv(name, raising=False)
    root = tmp_path / "served"
    root.mkdir()
    handler = functools.partial(FixtureHandler, directory=str(root))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield root, f"http://127.0.0.1:{httpd.server_address[1]}/"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


def test_download_fetches_both_files_and_they_prepare(server, tmp_path):
    root, url = server
    reviews, meta = write_mcauley_files(root)
    out = tmp_path / "downloads"
    paths = download_mcauley("beauty", out, base_url=url)
    assert [p.name for p in paths] == ["reviews_Beauty_5.json.gz", "meta_Beauty.json.gz"]
    assert paths[0].read_bytes() == reviews.read_bytes() and paths[1].read_bytes() == meta.read_bytes()
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in paths)  # no temp files
    stats = run_prepare(RunDir(tmp_path / "run"), PrepareConfig(dataset="beauty", format="mcauley",
                                                                data_dir=str(out)))
    assert stats["users"] == 5


def test_present_files_are_skipped_unless_forced(server, tmp_path):
    root, url = server
    write_mcauley_files(root)
    out = tmp_path / "downloads"
    out.mkdir()
    (out / "meta_Beauty.json.gz").write_bytes(b"kept")
    download_mcauley("beauty", out, base_url=url)
    assert (out / "meta_Beauty.json.gz").read_bytes() == b"kept"
    download_mcauley("beauty", out, base_url=url, force=True)
    assert (out / "meta_Beauty.json.gz").read_bytes() == (root / "meta_Beauty.json.gz").read_bytes()


def test_http_errors_are_clear_and_leave_nothing(server, tmp_path):
    _, url = server
    out = tmp_path / "downloads"
    with pytest.raises(DownloadError, match=r"reviews_Beauty_5\.json\.gz: HTTP 404"):
        download_mcauley("beauty", out, base_url=url)
    assert list(out.iterdir()) == []


def test_a_cut_off_download_is_not_renamed_into_place(server, tmp_path):
    _, url = server
    out = tmp_path / "downloads"
    out.mkdir()
    with pytest.raises(DownloadError, match="after 10 of 1,000 bytes"):
        download_file(url + "truncated/file.gz", out / "file.gz")
    assert list(out.iterdir()) == []


def test_an_unreachable_server_is_a_clear_error(tmp_path):
    import socket

    with socket.socket() as sock:  # a loopback port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(DownloadError, match="cannot connect"):
        download_file(f"http://127.0.0.1:{port}/x.gz", tmp_path / "x.gz", timeout=5)


def test_cli_download_reports_errors_without_a_traceback(server, tmp_path, monkeypatch, capsys):
    root, url = server
    monkeypatch.setattr(cli, "COMMANDS", (data_cli,))
    assert cli.main(["download", "--dataset", "toys", "--out", str(tmp_path / "d"),
                     "--base-url", url]) == 2
    assert capsys.readouterr().err.startswith("tiger download: error: http://127.0.0.1:")
    write_mcauley_files(root, dataset="toys")
    assert cli.main(["download", "--dataset", "toys", "--out", str(tmp_path / "d"),
                     "--base-url", url]) == 0
    assert (tmp_path / "d" / "meta_Toys_and_Games.json.gz").exists()
