"""Fetching the BIG-bench tarball through the package index pip is configured to use, served here on localhost."""

import base64
import hashlib
import http.server
import io
import json
import os
import socket
import sys
import tarfile
import threading

import pytest

from minorsft_trl.data import bigbench
from minorsft_trl.data.package_index import JSON_PAGE, package_indexes

NAME = bigbench.TARBALL_NAME
TASK = {
    "examples": [{"input": f"{i} m in cm is ", "target_scores": {f"{i}00 cm.": 1, f"{i} cm.": 0}} for i in range(4)]
}


def fake_tarball(path):
    """A small tarball laid out like the bigbench source package, with one task."""
    data = json.dumps(TASK).encode()
    with tarfile.open(path, "w:gz") as archive:
        info = tarfile.TarInfo(f"{bigbench.TASKS_PREFIX}units/metres/task.json")
        info.size = len(data)
        archive.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture(autouse=True)
def offline_and_isolated(tmp_path, monkeypatch):
    """No pip configuration but the test's own, no proxies, a fresh cache, and no connection beyond localhost."""
    for variable in list(os.environ):
        if variable.startswith("PIP_") or variable.lower().endswith("_proxy"):
            monkeypatch.delenv(variable)
    monkeypatch.setenv("no_proxy", "*")
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)  # pip then reads no config file at all
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "home" / ".config"))
    monkeypatch.setenv("MINORSFT_TRL_CACHE", str(tmp_path / "cache"))
    connect = socket.create_connection

    def local_only(address, *args, **kwargs):
        if address[0] not in ("127.0.0.1", "localhost"):
            raise AssertionError(f"a test tried to connect to {address}")
        return connect(address, *args, **kwargs)

    monkeypatch.setattr(socket, "create_connection", local_only)


class Index:
    """A simple index laid out in `root` (`simple/bigbench/index.html` linking `../../files/<name>`), served over
    HTTP on localhost; it logs the paths asked, can require a password and can answer PEP 691 JSON."""

    def __init__(self, root, tarball):
        self.root, self.requests, self.password, self.json = root, [], None, False
        (root / "files").mkdir(parents=True)
        (root / "files" / NAME).write_bytes(tarball.read_bytes())
        self.sha256 = hashlib.sha256(tarball.read_bytes()).hexdigest()
        self.write_page([f"../../files/{NAME}#sha256={self.sha256}", "../../files/bigbench-0.0.1.tar.gz"])

    def write_page(self, hrefs):
        (self.root / "simple" / "bigbench").mkdir(parents=True, exist_ok=True)
        links = "".join(f'<a href="{href}">{href.rpartition("/")[2].partition("#")[0]}</a>\n' for href in hrefs)
        (self.root / "simple" / "bigbench" / "index.html").write_text(f"<!DOCTYPE html><html><body>\n{links}</body>")

    def handler(self, *args, **kwargs):
        index = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def do_GET(self):
                index.requests.append(self.path)
                credentials = base64.b64encode(f"user:{index.password}".encode()).decode()
                if index.password and self.headers.get("Authorization") != f"Basic {credentials}":
                    return self.send_error(401)
                if index.json and self.path == "/simple/bigbench/" and JSON_PAGE in self.headers["Accept"]:
                    files = [{"filename": NAME, "url": f"../../files/{NAME}", "hashes": {"sha256": index.sha256}}]
                    body = json.dumps({"meta": {"api-version": "1.0"}, "name": "bigbench", "files": files}).encode()
                    self.send_response(200)
                    self.send_header("Content-Type", JSON_PAGE)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    return self.wfile.write(body)
                return super().do_GET()

            def log_message(self, *args):
                pass

        return Handler(*args, directory=str(self.root), **kwargs)


@pytest.fixture
def index(tmp_path):
    served = Index(tmp_path / "index", fake_tarball(tmp_path / "fake.tar.gz"))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), served.handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    served.url = f"http://127.0.0.1:{server.server_address[1]}/simple"
    yield served
    server.shutdown()
    server.server_close()
    thread.join()


@pytest.fixture
def expect_fake(monkeypatch, index):
    monkeypatch.setattr(bigbench, "TARBALL_SHA256", index.sha256)


def test_tarball_is_fetched_through_pip_index_url_and_a_task_is_read(monkeypatch, index, expect_fake, capsys):
    monkeypatch.setenv("PIP_INDEX_URL", index.url)
    examples = bigbench.task_examples("units/metres")
    assert len(examples) == 4 and examples[3]["completion"] == " 300 cm."
    assert index.requests == ["/simple/bigbench/", f"/files/{NAME}"]
    assert capsys.readouterr().out == f"Downloading {index.url[: -len('simple')]}files/{NAME} (358 MB, once) ...\n"
    assert bigbench.tarball().read_bytes() == (index.root / "files" / NAME).read_bytes()
    assert len(index.requests) == 2  # cached: not fetched again


def test_index_from_a_pip_config_file(monkeypatch, tmp_path, index, expect_fake):
    config = tmp_path / "pip.conf"
    config.write_text(f"[global]\nindex-url = {index.url}/\n")
    monkeypatch.setenv("PIP_CONFIG_FILE", str(config))
    assert package_indexes() == [f"{index.url}/"]
    assert bigbench.tarball().read_bytes() == (index.root / "files" / NAME).read_bytes()
    assert index.requests == ["/simple/bigbench/", f"/files/{NAME}"]


def test_pip_precedence_environment_over_download_section_over_global(monkeypatch, tmp_path):
    config = tmp_path / "pip.conf"
    config.write_text("[global]\nindex-url = http://global/simple\nextra-index-url = http://a/ http://b/\n")
    monkeypatch.setenv("PIP_CONFIG_FILE", str(config))
    assert package_indexes() == ["http://global/simple", "http://a/", "http://b/"]
    config.write_text(config.read_text() + "[download]\nindex-url = http://download/simple\n")
    assert package_indexes()[0] == "http://download/simple"
    monkeypatch.setenv("PIP_INDEX_URL", "http://env/simple")
    monkeypatch.setenv("PIP_EXTRA_INDEX_URL", "http://c/")
    assert package_indexes() == ["http://env/simple", "http://c/"]


def test_without_configuration_pips_default_index(monkeypatch):
    from pip._internal.models.index import PyPI

    assert package_indexes() == [PyPI.simple_url]
    monkeypatch.setenv("PIP_EXTRA_INDEX_URL", "http://extra/simple")
    assert package_indexes() == [PyPI.simple_url, "http://extra/simple"]


def test_without_pips_internals_the_environment_only(monkeypatch):
    for module in ("pip._internal.configuration", "pip._internal.models.index"):
        monkeypatch.setitem(sys.modules, module, None)  # importing it now fails
    with pytest.raises(OSError, match=r"No package index to download from.*Set PIP_INDEX_URL to a package index"):
        package_indexes()
    monkeypatch.setenv("PIP_INDEX_URL", "http://mirror/simple")
    assert package_indexes() == ["http://mirror/simple"]


def test_wrong_sha256_is_refused_naming_the_index(monkeypatch, index, tmp_path):
    monkeypatch.setenv("PIP_INDEX_URL", index.url)
    monkeypatch.setattr(bigbench, "TARBALL_SHA256", "0" * 64)
    with pytest.raises(OSError, match=rf"served by the package index {index.url}, has sha256 {index.sha256}.*refused"):
        bigbench.tarball()
    assert not list((tmp_path / "cache").rglob(NAME))  # nothing kept


@pytest.mark.parametrize("missing", ["page without the file", "no project page"])
def test_index_without_the_file_names_the_page_and_the_fix(monkeypatch, index, expect_fake, missing):
    if missing == "no project page":
        (index.root / "simple" / "bigbench" / "index.html").unlink()
        (index.root / "simple" / "bigbench").rmdir()
        reason = "HTTP Error 404"
    else:
        index.write_page(["../../files/bigbench-0.0.1.tar.gz"])
        reason = f"does not list {NAME}"
    monkeypatch.setenv("PIP_INDEX_URL", index.url)
    with pytest.raises(OSError) as error:
        bigbench.tarball()
    message = str(error.value)
    assert f"Could not find {NAME}" in message and f"{index.url}/bigbench/ ({reason}" in message
    assert "PIP_INDEX_URL (or `pip config set global.index-url URL`) chooses another index" in message


def test_extra_index_is_asked_when_the_index_lacks_the_file(monkeypatch, index, expect_fake):
    monkeypatch.setenv("PIP_INDEX_URL", index.url.replace("/simple", "/nothing-here"))
    monkeypatch.setenv("PIP_EXTRA_INDEX_URL", index.url)
    assert bigbench.tarball().is_file()
    assert index.requests == ["/nothing-here/bigbench/", "/simple/bigbench/", f"/files/{NAME}"]


def test_file_index(monkeypatch, index, expect_fake):
    monkeypatch.setenv("PIP_INDEX_URL", (index.root / "simple").as_uri())
    assert bigbench.load_task("units/metres") == TASK
    assert index.requests == []


def test_pep691_json_page(monkeypatch, index, expect_fake):
    index.json = True
    index.write_page([])  # the HTML page lists nothing: only the JSON answer has the file
    monkeypatch.setenv("PIP_INDEX_URL", index.url)
    assert bigbench.tarball().is_file()
    assert index.requests == ["/simple/bigbench/", f"/files/{NAME}"]


def test_credentials_in_the_index_url_are_sent_but_not_shown(monkeypatch, index, expect_fake, capsys):
    index.password = "s3cret"
    monkeypatch.setenv("PIP_INDEX_URL", index.url.replace("http://", "http://user:s3cret@"))
    assert bigbench.tarball().is_file()
    assert "s3cret" not in capsys.readouterr().out
    monkeypatch.setattr(bigbench, "TARBALL_SHA256", "0" * 64)
    with pytest.raises(OSError, match=f"index {index.url}, ") as error:
        bigbench.tarball()
    assert "s3cret" not in str(error.value)
