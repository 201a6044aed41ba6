"""Fetching bytes: local files, fsspec filesystems and HTTP, with its faults.

The only network is `faulty_host` (tests/faulty_host.py), on 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import os
import socket
import tarfile
import threading
import time
import zipfile
from collections import Counter
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path
from urllib.parse import quote

import fsspec
import pytest
from fsspec.registry import known_implementations

from tests.faulty_host import PAINTING
from transforms import fetch
from transforms.fetch import BackgroundFetcher, FetchPolicy, default_user_agent, locate
from transforms.images import ImageError


@pytest.fixture(autouse=True)
def quick_backoff(monkeypatch):
    """Retries wait milliseconds instead of seconds; Retry-After is still honoured."""
    monkeypatch.setattr(fetch, "BACKOFF_INITIAL_S", 0.01)


def fetch_one(uri: str, **policy) -> bytes:
    with BackgroundFetcher(FetchPolicy(**policy)) as fetcher:
        return fetcher.fetch(uri)


def assert_error(kind: str, uri: str, **policy) -> ImageError:
    with pytest.raises(ImageError) as caught:
        fetch_one(uri, **policy)
    assert caught.value.kind == kind, str(caught.value)
    return caught.value


# --- HTTP ----------------------------------------------------------------------------------


def test_one_get_per_image_and_no_head(faulty_host):
    assert fetch_one(f"{faulty_host.url}/painting.jpg") == PAINTING
    assert faulty_host.requests == Counter({("GET", "/painting.jpg"): 1})


def test_generic_user_agent_is_refused_and_the_default_one_passes(faulty_host):
    generic = "Python/3.11 aiohttp/3.14.5"
    error = assert_error("fetch_failed", f"{faulty_host.url}/painting.jpg", user_agent=generic)
    assert "HTTP 403" in error.message and "User-Agent policy" in error.message
    assert fetch_one(f"{faulty_host.url}/painting.jpg") == PAINTING


def test_default_user_agent_names_the_tool_its_page_and_the_contact():
    agent = default_user_agent("archive@example.org")
    assert agent.startswith("artstyle/")
    assert f"(+{fetch.PROJECT_URL}; archive@example.org)" in agent
    assert "aiohttp/" in agent and "Mozilla" not in agent


def test_a_transient_503_is_retried(faulty_host):
    assert fetch_one(f"{faulty_host.url}/flaky.jpg") == PAINTING
    assert faulty_host.gets("/flaky.jpg") == 2


def test_429_waits_as_long_as_retry_after_says(faulty_host):
    started = time.monotonic()
    assert fetch_one(f"{faulty_host.url}/throttled.jpg") == PAINTING
    assert time.monotonic() - started >= 0.95
    assert faulty_host.gets("/throttled.jpg") == 2


def test_retries_stop_at_max_retries_and_the_error_says_so(faulty_host):
    error = assert_error("fetch_failed", f"{faulty_host.url}/down.jpg", max_retries=2)
    assert "HTTP 503" in error.message and "(3 attempts)" in error.message
    assert faulty_host.gets("/down.jpg") == 3


def test_404_is_not_found_after_one_attempt(faulty_host):
    assert_error("not_found", f"{faulty_host.url}/missing.jpg")
    assert faulty_host.gets("/missing.jpg") == 1


def test_a_trickling_body_fails_at_the_deadline(faulty_host):
    started = time.monotonic()
    error = assert_error("fetch_failed", f"{faulty_host.url}/trickle.jpg", timeout_s=1.5)
    assert "timed out after 1.5 s" in error.message
    assert time.monotonic() - started < 5


def test_a_redirect_loop_is_a_clear_error(faulty_host):
    error = assert_error("fetch_failed", f"{faulty_host.url}/loop.jpg")
    assert "redirects" in error.message
    assert faulty_host.gets("/loop.jpg") <= fetch.MAX_REDIRECTS + 1  # bounded, and not retried


@pytest.mark.parametrize(
    "target", ["file:///etc/passwd", "gopher://127.0.0.1:70/1", "data:image/jpeg;base64,aGVsbG8="]
)
def test_a_redirect_to_another_scheme_is_fetch_failed_and_not_followed(faulty_host, target):
    url = f"{faulty_host.url}/redirect.jpg?to={quote(target, safe='')}"
    error = assert_error("fetch_failed", url)
    assert f"redirected to {target.split(':')[0]}: URLs, which are not read" in error.message
    assert faulty_host.gets("/redirect.jpg") == 1  # a refusal, not a fault: never retried


def test_a_redirect_to_a_url_without_a_host_is_fetch_failed(faulty_host):
    error = assert_error("fetch_failed", f"{faulty_host.url}/redirect.jpg?to=http:///a.jpg")
    assert "redirected to an invalid URL" in error.message


def test_an_answer_that_is_not_http_is_fetch_failed():
    """A server that answers in another protocol (an SSH banner) on the URL's port."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        url = f"http://127.0.0.1:{server.getsockname()[1]}/a.jpg"
        answering = threading.Thread(target=_answer_once, args=(server, b"SSH-2.0-OpenSSH\r\n\r\n"))
        answering.start()
        error = assert_error("fetch_failed", url, max_retries=0)
        answering.join(timeout=5)
    assert "not an HTTP answer" in error.message


def _answer_once(server: socket.socket, answer: bytes) -> None:
    connection, _ = server.accept()
    with connection:
        connection.recv(65536)
        connection.sendall(answer)


def test_a_connection_reset_mid_body_is_retried(faulty_host):
    assert fetch_one(f"{faulty_host.url}/reset.jpg") == PAINTING
    assert faulty_host.gets("/reset.jpg") == 2


def test_a_100_mb_body_is_too_large_without_being_read_whole(faulty_host):
    error = assert_error("too_large", f"{faulty_host.url}/endless.jpg", max_bytes=2**20)
    assert "--max_image_bytes=1,048,576" in error.message
    assert faulty_host.bytes_sent < 20 * 2**20  # what the socket buffers took, not 100 MB


def test_a_declared_length_over_the_cap_is_refused_before_reading(faulty_host):
    error = assert_error("too_large", f"{faulty_host.url}/declared_huge.jpg", max_bytes=2**20)
    assert "104,857,600 bytes" in error.message


def test_refused_connection_is_retried_then_fetch_failed():
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]  # bound, never listening: connections are refused
        error = assert_error("fetch_failed", f"http://127.0.0.1:{port}/a.jpg", max_retries=1)
    assert "(2 attempts)" in error.message


def test_a_server_that_never_answers_fails_at_the_deadline():
    with socket.socket() as silent:  # accepts connections (the kernel does), never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        url = f"http://127.0.0.1:{silent.getsockname()[1]}/a.jpg"
        error = assert_error("fetch_failed", url, timeout_s=1)
    assert "timed out after 1 s" in error.message and "127.0.0.1" in error.message


def test_upper_case_scheme_is_read(faulty_host):
    assert fetch_one(faulty_host.url.replace("http://", "HTTP://") + "/painting.jpg") == PAINTING


def test_fetches_run_concurrently_up_to_the_per_host_cap(faulty_host):
    policy = FetchPolicy(concurrency=16, max_connections_per_host=3)
    started = time.monotonic()
    with BackgroundFetcher(policy) as fetcher:
        futures = [fetcher.submit(f"{faulty_host.url}/slow/{n}.jpg") for n in range(12)]
        assert all(future.result() == PAINTING for future in futures)
    assert faulty_host.most_in_flight == 3
    assert time.monotonic() - started < 12 * 0.2  # at 3 at once, about 0.8 s


def test_wikimedia_hosts_share_a_cap_of_two():
    policy = FetchPolicy(max_connections_per_host=8)
    assert policy.host_cap("upload.wikimedia.org") == ("wikimedia.org", 2)
    assert policy.host_cap("commons.wikimedia.org") == ("wikimedia.org", 2)
    assert policy.host_cap("images.example.org") == ("images.example.org", 8)
    assert policy.host_cap("notwikimedia.org") == ("notwikimedia.org", 8)


# --- Files, and URIs as catalogs write them ---------------------------------------------------


def test_local_paths_are_paths(tmp_path):
    odd = tmp_path / "[2024]" / "a::b.jpg"  # a glob's brackets, an fsspec chain's colons
    odd.parent.mkdir()
    odd.write_bytes(PAINTING)
    assert fetch_one(str(odd)) == PAINTING


def test_file_uris_are_percent_decoded(tmp_path):
    (tmp_path / "Le Rêve.jpg").write_bytes(PAINTING)
    assert fetch_one(f"file://{tmp_path}/Le%20R%C3%AAve.jpg") == PAINTING


def test_data_uris_are_read():
    assert fetch_one("data:image/jpeg;base64,aGVsbG8=") == b"hello"


def test_file_errors_have_their_kinds(tmp_path):
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "big.jpg").write_bytes(b"x" * 101)
    (tmp_path / "exact.jpg").write_bytes(b"x" * 100)
    assert_error("not_found", str(tmp_path / "missing.jpg"))
    assert_error("empty", str(tmp_path / "empty.jpg"))
    assert_error("not_a_file", str(tmp_path))
    assert_error("too_large", str(tmp_path / "big.jpg"), max_bytes=100)
    assert fetch_one(str(tmp_path / "exact.jpg"), max_bytes=100) == b"x" * 100
    assert_error("missing_uri", "  ")


@pytest.fixture
def special_files(tmp_path) -> Iterator[dict[str, str]]:
    """What a catalog can name that is not a regular file, by what it is, as written in it.
    A FIFO that a broken reader waits on is opened for writing at the end, so the reader
    (and the test run) is never left hanging."""
    fifo = tmp_path / "fifo.jpg"
    os.mkfifo(fifo)
    (tmp_path / "folder.jpg").mkdir()
    (tmp_path / "to-fifo.jpg").symlink_to(fifo)
    (tmp_path / "to-zero.jpg").symlink_to("/dev/zero")
    unix_socket = socket.socket(socket.AF_UNIX)
    unix_socket.bind(str(tmp_path / "socket.jpg"))
    try:
        yield {
            "a character device": "/dev/zero",
            "a character device (file://)": "file:///dev/zero",
            "a character device (local://)": "local:///dev/zero",
            "a character device (a symlink)": str(tmp_path / "to-zero.jpg"),
            "a FIFO": str(fifo),
            "a FIFO (a symlink)": str(tmp_path / "to-fifo.jpg"),
            "a socket": str(tmp_path / "socket.jpg"),
            "a directory": str(tmp_path / "folder.jpg"),
        }
    finally:
        unix_socket.close()
        with contextlib.suppress(OSError):  # no reader is waiting: nothing to release
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))


def test_what_is_not_a_regular_file_is_not_a_file_before_it_is_read(special_files):
    """A device would give bytes for ever and a FIFO would block until a writer came: each
    is refused without waiting for the deadline or reading up to the cap."""
    with BackgroundFetcher(FetchPolicy(timeout_s=3, max_bytes=2**20)) as fetcher:
        futures = {what: fetcher.submit(uri) for what, uri in special_files.items()}
        for what, future in futures.items():
            with pytest.raises(ImageError) as caught:
                future.result()
            assert caught.value.kind == "not_a_file", (what, str(caught.value))
            assert f"is {what.split(' (')[0]}, not a file" in caught.value.message, what


# --- Members of archives ----------------------------------------------------------------------


def make_zip(path: Path) -> Path:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("paintings/a.jpg", PAINTING)
        archive.writestr("paintings/big.jpg", b"x" * 2000)
        archive.writestr("folder/", b"")
        archive.writestr("folder/b.jpg", PAINTING)
    return path


def make_tar(path: Path, fifo: Path) -> Path:
    """A member of each kind a tar can hold; only the file and the link to it have bytes."""

    def member(name: str, **fields) -> tarfile.TarInfo:
        info = tarfile.TarInfo(name)
        for key, value in fields.items():
            setattr(info, key, value)
        return info

    with tarfile.open(path, "w:gz") as archive:
        archive.addfile(member("a.jpg", size=len(PAINTING)), BytesIO(PAINTING))
        archive.addfile(member("link.jpg", type=tarfile.LNKTYPE, linkname="a.jpg"))
        archive.addfile(member("zero.jpg", type=tarfile.CHRTYPE, devmajor=1, devminor=5))
        archive.addfile(member("to-zero.jpg", type=tarfile.SYMTYPE, linkname="zero.jpg"))
        archive.add(fifo, arcname="fifo.jpg")
        archive.addfile(member("outside.jpg", type=tarfile.SYMTYPE, linkname="/dev/zero"))
    return path


def test_members_of_zip_and_tar_archives_are_read(tmp_path):
    os.mkfifo(tmp_path / "fifo")
    archive = make_zip(tmp_path / "paintings.zip")
    assert fetch_one(f"zip://paintings/a.jpg::{archive}") == PAINTING
    assert fetch_one(f"ZIP://folder/b.jpg::file://{quote(str(archive))}") == PAINTING
    tar = make_tar(tmp_path / "paintings.tar.gz", tmp_path / "fifo")
    assert fetch_one(f"tar://a.jpg::{tar}") == PAINTING
    assert fetch_one(f"tar://link.jpg::{tar}") == PAINTING


def test_archive_errors_have_their_kinds(tmp_path):
    os.mkfifo(tmp_path / "fifo")
    archive = make_zip(tmp_path / "paintings.zip")
    tar = make_tar(tmp_path / "paintings.tar.gz", tmp_path / "fifo")
    (tmp_path / "not-a.zip").write_bytes(PAINTING)
    assert_error("not_found", f"zip://paintings/missing.jpg::{archive}")
    assert_error("not_found", f"zip://a.jpg::{tmp_path / 'missing.zip'}")
    assert_error("not_found", f"tar://outside.jpg::{tar}")  # a link out of the archive
    assert_error("not_a_file", f"zip://folder::{archive}")
    assert_error("not_a_file", f"zip://folder/::{archive}")
    assert_error("not_a_file", f"zip://a.jpg::{tmp_path}")
    for special in ("zero.jpg", "to-zero.jpg", "fifo.jpg"):
        error = assert_error("not_a_file", f"tar://{special}::{tar}")
        assert "has no bytes of its own" in error.message, special
    error = assert_error("too_large", f"zip://paintings/big.jpg::{archive}", max_bytes=1000)
    assert "2,000 bytes" in error.message
    error = assert_error("fetch_failed", f"zip://a.jpg::{tmp_path / 'not-a.zip'}")
    assert "BadZipFile" in error.message
    error = assert_error("fetch_failed", "zip://paintings/a.jpg")
    assert "zip://MEMBER::ARCHIVE" in error.message


def test_an_archive_that_is_not_a_regular_file_is_not_a_file(special_files):
    for what in ("a FIFO", "a character device"):
        error = assert_error("not_a_file", f"zip://a.jpg::{special_files[what]}", timeout_s=3)
        assert f"is {what}, not a file" in error.message


def test_unknown_scheme_and_missing_package_are_unsupported(monkeypatch):
    assert_error("unsupported_scheme", "nosuch://x/y.jpg")
    monkeypatch.setitem(
        known_implementations,
        "nosuchfs",
        {"class": "nosuchfs_pkg.FS", "err": "Install nosuchfs-pkg to read nosuchfs://"},
    )
    error = assert_error("unsupported_scheme", "nosuchfs://bucket/y.jpg")
    assert "nosuchfs-pkg" in error.message


def test_locate_keeps_the_uri_as_written():
    located = locate("HTTP://Example.org/a b.jpg")
    assert (located.uri, located.scheme) == ("HTTP://Example.org/a b.jpg", "http")
    assert located.target == "http://Example.org/a b.jpg"


# --- Object stores, through a filesystem that fails on purpose ----------------------------------


def test_a_transient_filesystem_fault_is_retried(flaky_filesystem):
    assert fetch_one("flakytest://bucket/a.jpg") == PAINTING
    assert flaky_filesystem.reads["bucket/a.jpg"] == 2


def test_a_filesystem_that_always_fails_is_tried_max_retries_plus_one_times(
    flaky_filesystem, monkeypatch
):
    monkeypatch.setattr(flaky_filesystem, "failures", 100)
    error = assert_error("fetch_failed", "flakytest://bucket/b.jpg", max_retries=2)
    assert "ConnectionResetError" in error.message and "(3 attempts)" in error.message
    assert flaky_filesystem.reads["bucket/b.jpg"] == 3


def test_a_library_that_retries_on_its_own_is_not_retried_again(faulty_host, monkeypatch):
    """gcsfs against the test server, which answers 503 to everything it does not know: as
    many requests as gcsfs makes on its own, not that many times (max_retries + 1)."""
    import gcsfs.retry

    async def no_wait(seconds):
        return None

    monkeypatch.setenv("STORAGE_EMULATOR_HOST", faulty_host.url)
    monkeypatch.setattr(gcsfs.retry.asyncio, "sleep", no_wait)
    monkeypatch.setitem(fsspec.config.conf, "gs", {"token": "anon"})
    fetch._filesystem.cache_clear()
    gcsfs.GCSFileSystem.clear_instance_cache()
    server_paths = "/download/storage/v1/b/bucket/o/a.jpg"
    try:
        error = assert_error("fetch_failed", "gs://bucket/a.jpg", max_retries=3)
    finally:
        fetch._filesystem.cache_clear()
        gcsfs.GCSFileSystem.clear_instance_cache()
    assert "(1 attempt)" in error.message
    assert sum(n for (_, path), n in faulty_host.requests.items() if path == server_paths) == 6
