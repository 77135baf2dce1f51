"""Files fetched through the package index pip is configured to use, so mirrors, proxies and private indexes work
and no registry host is written here.

pip's own configuration loader gives the indexes (`PIP_INDEX_URL`, `PIP_EXTRA_INDEX_URL`, pip's config files; pip's
default index when nothing is set); a project's page on them (PEP 503 HTML or PEP 691 JSON) gives the file's URL.
Used for files that cannot be `pip download`ed, such as the `bigbench` source tarball, whose metadata pip cannot build.
"""

import contextlib
import json
import os
import shutil
import ssl
import urllib.request
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urldefrag, urljoin, urlsplit

from ..cache import file_sha256

JSON_PAGE = "application/vnd.pypi.simple.v1+json"  # PEP 691; otherwise the page is PEP 503 HTML
CHOOSE_INDEX = "PIP_INDEX_URL (or `pip config set global.index-url URL`) chooses another index"


def package_indexes() -> list[str]:
    """The package indexes `pip download` would ask: its `index-url`, then each `extra-index-url`.

    pip's own configuration loader reads them, with pip's precedence: the environment (`PIP_INDEX_URL`,
    `PIP_EXTRA_INDEX_URL`) over the `[download]` (or `[install]`) section over `[global]` of pip's config files
    (`PIP_CONFIG_FILE` and the global, user and site `pip.conf`). Without an `index-url`, pip's default index.
    """
    index, extra = _pip_setting("index-url"), _pip_setting("extra-index-url")
    if not index:
        with contextlib.suppress(ImportError):
            from pip._internal.models.index import PyPI

            index = PyPI.simple_url
    if not index and not extra:
        raise OSError(
            "No package index to download from: pip's default index is unknown here (pip's internals are "
            "unavailable). Set PIP_INDEX_URL to a package index."
        )
    return ([index] if index else []) + (extra or "").split()


def _pip_setting(name: str) -> str | None:
    try:
        from pip._internal.configuration import Configuration
        from pip._internal.exceptions import ConfigurationError
    except ImportError:  # pip's internals are unavailable: its environment variables only
        return os.environ.get("PIP_" + name.upper().replace("-", "_")) or None
    config = Configuration(isolated=False)
    config.load()
    for section in (":env:", "download", "install", "global"):
        with contextlib.suppress(ConfigurationError):
            if value := config.get_value(f"{section}.{name}"):
                return value
    return None


def _opener(indexes: list[str]) -> urllib.request.OpenerDirector:
    """An opener like urllib's default one (proxies from the environment, `file://` URLs) that trusts pip's `cert`
    and sends the credentials written into an index URL (a `user:token@` before its host) to that host only."""
    passwords = urllib.request.HTTPPasswordMgrWithPriorAuth()
    for index in indexes:
        parts = urlsplit(index)
        if parts.username is not None:
            root = f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}"
            passwords.add_password(
                None, root, unquote(parts.username), unquote(parts.password or ""), is_authenticated=True
            )
    cert = _pip_setting("cert")
    directory = cert is not None and os.path.isdir(cert)
    try:
        context = ssl.create_default_context(cafile=None if directory else cert, capath=cert if directory else None)
    except OSError as error:
        raise OSError(
            f"pip's cert setting {cert!r} is not a readable CA bundle ({error}); fix it with PIP_CERT or "
            f"`pip config set global.cert PATH`."
        ) from error
    return urllib.request.build_opener(
        urllib.request.HTTPBasicAuthHandler(passwords), urllib.request.HTTPSHandler(context=context)
    )


def _without_credentials(url: str) -> str:
    parts = urlsplit(url)
    return parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl()


class _Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.base, self.hrefs = None, []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        href = dict(attrs).get("href")
        if tag == "base" and href and self.base is None:
            self.base = href
        elif tag == "a" and href:
            self.hrefs.append(href)


def _project_page(index: str, project: str) -> str:
    page = f"{index.rstrip('/')}/{project}/"
    if urlsplit(page).scheme == "file" and os.path.isdir(urllib.request.url2pathname(urlsplit(page).path)):
        page += "index.html"  # as pip reads a `file://` index
    return page


def _file_link(opener: urllib.request.OpenerDirector, page: str, filename: str) -> str | None:
    """The URL of `filename` on a project page (PEP 503 HTML or PEP 691 JSON), or None if it is not listed."""
    request = urllib.request.Request(page, headers={"Accept": f"{JSON_PAGE}, text/html;q=0.1"})
    with opener.open(request, timeout=60) as response:
        base, body, headers = response.geturl(), response.read(), response.headers
    if headers.get_content_type() == JSON_PAGE:
        files = [(file["filename"], urljoin(base, file["url"])) for file in json.loads(body)["files"]]
    else:
        links = _Links()
        links.feed(body.decode(headers.get_content_charset() or "utf-8", errors="replace"))
        base = urljoin(base, links.base or "")
        files = [(unquote(urlsplit(href).path).rpartition("/")[2], urljoin(base, href)) for href in links.hrefs]
    return next((urldefrag(url).url for name, url in files if name == filename), None)


def download_from_index(project: str, filename: str, sha256: str, path: Path, size: str) -> None:
    """Download `filename` of `project` into `path` through the first package index pip uses that lists it, and
    refuse it unless its content has `sha256`. `size` is only said to the user."""
    indexes = package_indexes()
    opener = _opener(indexes)
    misses = []
    for index in map(_without_credentials, indexes):
        page = _project_page(index, project)
        try:
            url = _file_link(opener, page, filename)
        except (OSError, ValueError) as error:  # unreachable index, no project page, unreadable page
            misses.append(f"{page} ({error})")
            continue
        if url is None:
            misses.append(f"{page} (does not list {filename})")
            continue
        print(f"Downloading {url} ({size}, once) ...", flush=True)
        try:
            with opener.open(url, timeout=60) as response, open(path, "wb") as file:
                shutil.copyfileobj(response, file, length=1 << 22)
        except OSError as error:
            raise OSError(
                f"Downloading {url} from the package index {index} failed ({error}). Try again, or {CHOOSE_INDEX}."
            ) from error
        if (served := file_sha256(path)) != sha256:
            raise OSError(
                f"{url}, served by the package index {index}, has sha256 {served}, not {sha256}: refused. "
                f"Try again, or if that index's copy of {filename} differs, {CHOOSE_INDEX}."
            )
        return
    raise OSError(
        f"Could not find {filename} on the package indexes pip uses: asked {'; '.join(misses)}. "
        f"{CHOOSE_INDEX} (one that has the {project} project, e.g. a mirror); PIP_EXTRA_INDEX_URL adds one."
    )
