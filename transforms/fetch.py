"""Image bytes from any URI: many fetches in flight, polite to hosts, patient with faults.

A collection is read over the network as often as from disk: museum APIs, Wikimedia
Commons and IIIF servers over HTTP(S), buckets over `gs://` and `s3://`. Each request
waits tens or hundreds of milliseconds, so a worker keeps dozens in flight on one event
loop (`FetchPolicy.concurrency`) while its CPU threads decode and its model computes.

Politeness, as the hosts' policies ask: an honest User-Agent that names the tool (generic
library ones are refused by Wikimedia with 403), a cap on connections per host (2 for
Wikimedia, as its robot policy asks), one GET per image (no HEAD first), and backoff that
honours `Retry-After`. Transient faults (dropped connections, timeouts, HTTP 408, 429 and
5xx answers that mean "later") are retried; permanent ones are not. Every image has one
deadline for all its attempts, so a host that trickles bytes holds neither its row nor
the run. Byte caps are enforced while streaming, so a huge body is never read whole.

Every failure is an `ImageError` whose kind the pipeline turns into an error row:

    missing_uri         the row has no image URI
    not_found           nothing at the URI (missing file or object, HTTP 404 or 410)
    not_a_file          the URI names a directory, a device, a FIFO, a socket (or a link to
                        one), or a member of an archive that is one: refused before reading
    unsupported_scheme  no filesystem for the URI's scheme, or its package is missing
    fetch_failed        network, DNS, timeout, permission or other HTTP/storage errors,
                        after the retries the policy allows; a redirect to another scheme
                        (file://, gopher://); an answer that is not HTTP
    too_large           more than --max_image_bytes
    empty               0 bytes
    forbidden_address   the caller's `socket_factory` refused every address of the host
                        (ForbiddenAddress): never retried

Paths are paths: a catalog row's local path is opened as written (no glob, no fsspec
chain like `a::b`), `file://` URIs are percent-decoded, and schemes are case-insensitive.
A member of a zip or tar archive is named as fsspec chains it, `zip://MEMBER::ARCHIVE`,
where ARCHIVE is a path or URI as any other row writes it.
"""

from __future__ import annotations

import asyncio
import email.utils
import os
import random
import re
import stat
import threading
from collections.abc import Callable, Coroutine
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cache, lru_cache
from importlib import metadata
from typing import IO, Any, BinaryIO
from urllib.parse import urlsplit
from urllib.request import url2pathname

import aiohttp
import fsspec
import tenacity
from fsspec.archive import AbstractArchiveFileSystem
from fsspec.implementations.tar import TarFileSystem

from transforms.images import ImageError, brief, describe, over_the_cap
from transforms.library_internals import strip_protocol

PROJECT_URL = "https://github.com/artstyle-project/artstyle"

# Whole museum scans run to tens of megabytes; anything beyond this is more likely a
# mistake (a video, an archive) than a painting, and would hold a worker's memory hostage.
DEFAULT_MAX_BYTES = 64 * 2**20

# HTTP answers that mean "try again later"; the rest of 4xx and 5xx will not change.
TRANSIENT_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})
GONE_STATUSES = frozenset({404, 410})

# Wikimedia's robot policy asks for at most 2 concurrent requests; Special:FilePath on
# commons redirects to upload, so all its hosts share one cap.
HOST_GROUP_CAPS = {"wikimedia.org": 2}

# Backoff between attempts: 0.5 s, 1 s, 2 s, ... with full jitter, never more than this.
BACKOFF_INITIAL_S = 0.5
BACKOFF_MAX_S = 8.0
# A `Retry-After` longer than this is not waited for: the image becomes an error row.
RETRY_AFTER_CAP_S = 30.0
MAX_REDIRECTS = 5
# A slow first byte or a stalled stream is given up on after this, within the deadline.
SOCKET_TIMEOUT_S = 20.0

# Libraries that retry transient faults on their own (gcsfs 6 attempts, s3fs 5, with their
# own backoff): a second layer of retries would multiply theirs, so they get one attempt.
SELF_RETRYING_SCHEMES = frozenset({"gs", "gcs", "s3", "s3a"})

# Archives whose members are named as fsspec chains them: `zip://MEMBER::ARCHIVE`, where
# ARCHIVE is written as any other URI of the catalog (a path, file://, gs://, ...). Each
# archive is opened once for all its members' reads, up to this many at a time.
ARCHIVE_SCHEMES = frozenset({"zip", "tar"})
OPEN_ARCHIVES = 32

# `scheme://...`, or a data: URI (fsspec knows those without slashes).
_SCHEME = re.compile(r"^(?:([A-Za-z][A-Za-z0-9+.-]*)://|(data):)", re.IGNORECASE)
_READ_CHUNK = 256 * 1024


def default_user_agent(contact: str | None = None) -> str:
    """`artstyle/<version> (+<project URL>[; contact]) aiohttp/<version>`: who is asking,
    and where to read about it, as Wikimedia's User-Agent policy asks of every client."""
    try:
        version = metadata.version("artstyle")
    except metadata.PackageNotFoundError:  # running from a source tree that is not installed
        version = "dev"
    about = f"+{PROJECT_URL}" + (f"; {contact}" if contact else "")
    return f"artstyle/{version} ({about}) aiohttp/{aiohttp.__version__}"


@dataclass(frozen=True)
class FetchPolicy:
    """How hard and how politely to fetch: the pipeline's fetch flags, in one picklable value."""

    concurrency: int = 32
    max_connections_per_host: int = 8
    max_retries: int = 3
    timeout_s: float = 60.0  # per image, all attempts and waits together
    max_bytes: int = DEFAULT_MAX_BYTES
    user_agent: str = field(default_factory=default_user_agent)

    def host_cap(self, host: str) -> tuple[str, int]:
        """The connection cap for `host`, and the key of the group that shares it."""
        for group, cap in HOST_GROUP_CAPS.items():
            if host == group or host.endswith(f".{group}"):
                return group, min(cap, self.max_connections_per_host)
        return host, self.max_connections_per_host


class ForbiddenAddress(OSError):
    """What a `socket_factory` raises to refuse an address: a refusal, not a network fault,
    so it is never retried. One message for every address (aiohttp keeps the exception's
    type only when all of a host's addresses fail alike), and none that names the address:
    a stranger learns nothing of the networks behind the caller."""

    def __init__(self) -> None:
        super().__init__("the host's address is not a public one")


class _Transient(Exception):
    """One attempt failed in a way that another attempt may not."""

    def __init__(self, reason: str, retry_after: float | None = None):
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after


@dataclass(frozen=True)
class Location:
    """Where a URI's bytes are: a scheme (lower case; "" for local paths) and the rest."""

    uri: str
    scheme: str
    target: str  # an http(s) URL, a local path, the URI for fsspec, or an archive's member
    archive: Location | None = None  # where the member's archive is (zip:// and tar://)

    @property
    def storage(self) -> Location:
        """Where the bytes are stored: an archive's own location, for a member of one."""
        return self.archive.storage if self.archive else self


def scheme_of(uri: str) -> str | None:
    """The URI's scheme in lower case ("data" for data: URIs), or None for a path."""
    match = _SCHEME.match(uri)
    return None if match is None else (match.group(1) or match.group(2)).lower()


def locate(uri: str) -> Location:
    """Parses `uri` the way a catalog means it: see the module's note on paths."""
    scheme = scheme_of(uri)
    if scheme is None:
        return Location(uri, "", uri)
    if scheme == "data":
        return Location(uri, "data", uri)
    target = f"{scheme}{uri[len(scheme) :]}"
    if scheme == "file":
        return Location(uri, "", url2pathname(urlsplit(target).path))
    if scheme == "local":  # fsspec's other name for local files, not percent-encoded
        return Location(uri, "", target.removeprefix("local://"))
    if scheme in ARCHIVE_SCHEMES:
        member, _, archive = target.removeprefix(f"{scheme}://").partition("::")
        return Location(uri, scheme, member.lstrip("/"), locate(archive) if archive else None)
    return Location(uri, scheme, target)


class Fetcher:
    """Fetches bytes on the running event loop; use as `async with Fetcher(policy) as f`.

    `socket_factory` lets a caller vet every address before a connection is made (the
    service's guard against requests to private networks); see aiohttp's TCPConnector.
    """

    def __init__(
        self,
        policy: FetchPolicy,
        socket_factory: Callable[[tuple], Any] | None = None,
    ):
        self.policy = policy
        self._socket_factory = socket_factory
        self._slots = asyncio.Semaphore(policy.concurrency)
        self._host_slots: dict[str, asyncio.Semaphore] = {}
        self._session: aiohttp.ClientSession | None = None
        # Blocking filesystems (local disk, and gcsfs's and s3fs's sync API, which hand
        # the work to fsspec's own event loop) are read on threads, as many as fetches.
        self._files = ThreadPoolExecutor(policy.concurrency, thread_name_prefix="fetch-file")

    async def __aenter__(self) -> Fetcher:
        connector = aiohttp.TCPConnector(
            limit=self.policy.concurrency,
            limit_per_host=self.policy.max_connections_per_host,
            socket_factory=self._socket_factory,
        )
        timeout = aiohttp.ClientTimeout(sock_connect=SOCKET_TIMEOUT_S, sock_read=SOCKET_TIMEOUT_S)
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=timeout,
            headers={"User-Agent": self.policy.user_agent},
            auto_decompress=True,
        )
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
        self._files.shutdown(wait=False, cancel_futures=True)

    async def fetch(self, uri: str) -> bytes:
        """The bytes at `uri`, or an ImageError that says why not, within the deadline."""
        if not uri or not uri.strip():
            raise ImageError("missing_uri", "the row has no image URI")
        location = locate(uri.strip())
        attempts = _Attempts()
        async with self._slots:
            try:
                async with asyncio.timeout(self.policy.timeout_s):
                    return await self._with_retries(location, attempts)
            except TimeoutError:
                reason = f"timed out after {self.policy.timeout_s:g} s ({attempts})"
                raise ImageError("fetch_failed", f"could not read {brief(uri)}: {reason}") from None

    async def _with_retries(self, location: Location, attempts: _Attempts) -> bytes:
        retries = 0 if location.storage.scheme in SELF_RETRYING_SCHEMES else self.policy.max_retries
        retrying = tenacity.AsyncRetrying(
            stop=tenacity.stop_after_attempt(retries + 1),
            wait=_backoff,
            retry=tenacity.retry_if_exception_type(_Transient),
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    attempts.count += 1
                    return await self._read_once(location)
        except _Transient as error:
            message = f"could not read {brief(location.uri)}: {error.reason} ({attempts})"
            raise ImageError("fetch_failed", message) from None
        raise AssertionError("tenacity ends in a return or a raise")  # pragma: no cover

    async def _read_once(self, location: Location) -> bytes:
        if location.scheme in ("http", "https"):
            async with self._host_slot(location.target):
                data = await self._get(location)
        else:
            loop = asyncio.get_running_loop()
            data = await loop.run_in_executor(
                self._files, _read_file, location, self.policy.max_bytes
            )
        if not data:
            raise ImageError("empty", f"{brief(location.uri)} is empty (0 bytes)")
        return data

    def _host_slot(self, url: str) -> asyncio.Semaphore:
        group, cap = self.policy.host_cap(urlsplit(url).hostname or "")
        if group not in self._host_slots:
            self._host_slots[group] = asyncio.Semaphore(cap)
        return self._host_slots[group]

    async def _get(self, location: Location) -> bytes:
        """One GET, streamed up to the byte cap; HTTP errors become _Transient or ImageError."""
        assert self._session is not None, "use the Fetcher as an async context manager"
        try:
            async with self._session.get(location.target, max_redirects=MAX_REDIRECTS) as response:
                if response.status != 200:
                    raise await _status_error(response, location.uri)
                declared = response.content_length
                if declared is not None and declared > self.policy.max_bytes:
                    message = f"{brief(location.uri)} is {declared:,} bytes, "
                    raise ImageError("too_large", message + over_the_cap(self.policy.max_bytes))
                return await _read_body(response.content, location.uri, self.policy.max_bytes)
        except aiohttp.TooManyRedirects:
            reason = f"more than {MAX_REDIRECTS} redirects (a redirect loop?)"
            raise _fetch_failed(location.uri, reason) from None
        except aiohttp.NonHttpUrlRedirectClientError as error:
            scheme = urlsplit(str(error)).scheme or "non-HTTP"
            reason = f"redirected to {scheme}: URLs, which are not read"
            raise _fetch_failed(location.uri, reason) from None
        except aiohttp.InvalidUrlRedirectClientError:
            raise _fetch_failed(location.uri, "redirected to an invalid URL") from None
        except aiohttp.ClientConnectorDNSError as error:
            reason = f"the host name does not resolve ({describe(error)})"
            message = f"could not read {brief(location.uri)}: {reason}"
            raise ImageError("fetch_failed", message) from error
        except aiohttp.ClientConnectorError as error:
            if not isinstance(error.os_error, ForbiddenAddress):
                raise _Transient(describe(error)) from error
            message = f"refused to read {brief(location.uri)}: {error.os_error}"
            raise ImageError("forbidden_address", message) from None
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as error:
            raise _Transient(describe(error)) from error
        except TimeoutError as error:
            raise _Transient(f"no data for {SOCKET_TIMEOUT_S:g} s") from error
        except (aiohttp.InvalidURL, ValueError) as error:
            message = f"{brief(location.uri)} is not a valid URL ({describe(error)})"
            raise ImageError("fetch_failed", message) from error
        except aiohttp.ClientResponseError as error:  # the HTTP parser's refusal
            reason = f"not an HTTP answer ({_first_line(error.message)})"
            raise _fetch_failed(location.uri, reason) from error
        except aiohttp.ClientError as error:
            raise _fetch_failed(location.uri, describe(error)) from error


def _fetch_failed(uri: str, reason: str) -> ImageError:
    return ImageError("fetch_failed", f"could not read {brief(uri)}: {reason}")


def _first_line(text: str) -> str:
    return text.strip().split("\n", 1)[0].strip().rstrip(":")[:160] or "nothing"


@dataclass
class _Attempts:
    count: int = 0

    def __str__(self) -> str:
        return f"{self.count} attempt{'s' if self.count != 1 else ''}"


def _backoff(state: tenacity.RetryCallState) -> float:
    """Exponential backoff with full jitter, or the server's Retry-After up to a cap."""
    error = state.outcome.exception() if state.outcome else None
    if isinstance(error, _Transient) and error.retry_after is not None:
        return min(error.retry_after, RETRY_AFTER_CAP_S)
    ceiling = min(BACKOFF_MAX_S, BACKOFF_INITIAL_S * 2 ** (state.attempt_number - 1))
    return random.uniform(ceiling / 2, ceiling)


async def _status_error(response: aiohttp.ClientResponse, uri: str) -> Exception:
    """What an HTTP error answer means for this image, with the start of the server's words
    (Wikimedia's 403 names the policy that was broken)."""
    reason = f"HTTP {response.status} {response.reason or ''}".rstrip()
    if response.status in GONE_STATUSES:
        return ImageError("not_found", f"{brief(uri)} does not exist ({reason})")
    if response.status in TRANSIENT_STATUSES:
        return _Transient(reason, _retry_after(response.headers.get("Retry-After")))
    try:
        said = (await response.content.read(300)).decode("utf-8", "replace")
    except (aiohttp.ClientError, TimeoutError):
        said = ""
    said = " ".join(said.split())[:160]
    return ImageError(
        "fetch_failed", f"could not read {brief(uri)}: {reason}" + (f": {said}" if said else "")
    )


def _retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header: a number of seconds or an HTTP date."""
    if not value:
        return None
    if value.strip().isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


async def _read_body(stream: aiohttp.StreamReader, uri: str, max_bytes: int) -> bytes:
    """The body, given up on one chunk past the cap: a server that says nothing of its size
    (or lies about it) cannot flood memory."""
    body = bytearray()
    async for chunk in stream.iter_chunked(_READ_CHUNK):
        body += chunk
        if len(body) > max_bytes:
            raise ImageError("too_large", f"{brief(uri)} is {over_the_cap(max_bytes)}")
    return bytes(body)


# --- Files, objects through fsspec, and members of archives --------------------------------


def read_file(uri: str, max_bytes: int = DEFAULT_MAX_BYTES) -> bytes:
    """A local file, fsspec object or archive member in one read, for synchronous callers:
    no retries."""
    try:
        return _read_file(locate(uri), max_bytes)
    except _Transient as error:
        raise _fetch_failed(uri, error.reason) from None


def _read_file(location: Location, max_bytes: int) -> bytes:
    """At most `max_bytes` bytes of the file, object or member, in one read (of one byte
    more, to tell one over the cap)."""
    try:
        if location.scheme in ARCHIVE_SCHEMES:
            data = _read_member(location, max_bytes)
        elif not location.scheme:
            with _open_regular_file(location.target) as file:
                data = file.read(max_bytes + 1)
        else:
            fs = _filesystem(location.scheme)
            data = fs.cat_file(strip_protocol(fs, location.target), start=0, end=max_bytes + 1)
    except Exception as error:
        raise _file_error(error, location.uri) from error
    if len(data) > max_bytes:
        raise ImageError("too_large", f"{brief(location.uri)} is {over_the_cap(max_bytes)}")
    return data


def _open_regular_file(path: str) -> BinaryIO:
    """The local file at `path`, opened only if it is a regular file (after symlinks): a FIFO
    would hold the open until a writer came, and a device (/dev/zero, /dev/urandom) would
    give bytes for ever. The open itself cannot block, and what it opened is checked again,
    in case something else took the path's place in between."""
    _check_regular(os.stat(path).st_mode, path)
    file = open(path, "rb", opener=lambda path, flags: os.open(path, flags | _NEVER_WAIT))  # noqa: SIM115
    try:
        _check_regular(os.fstat(file.fileno()).st_mode, path)
    except ImageError:
        file.close()
        raise
    return file


def _check_regular(mode: int, path: str) -> None:
    if stat.S_ISREG(mode):
        return
    what = next((name for test, name in _FILE_TYPES if test(mode)), "not a regular file")
    raise ImageError("not_a_file", f"{brief(path)} is {what}, not a file")


# Opening never waits (for a FIFO's writer) nor takes a terminal as the process's own.
_NEVER_WAIT = getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0)
_FILE_TYPES = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISSOCK, "a socket"),
)


@dataclass
class _OpenArchive:
    """An archive's index, kept open for the reads of its members. One read at a time:
    tarfile's reader shares one file position between its members."""

    files: AbstractArchiveFileSystem
    lock: threading.Lock = field(default_factory=threading.Lock)


def _read_member(location: Location, max_bytes: int) -> bytes:
    """At most `max_bytes` + 1 bytes of a member of a zip or tar archive."""
    archive = _open_archive(location.scheme, location.archive)
    with archive.lock:
        info = archive.files.info(location.target)  # FileNotFoundError for a missing member
        if info["type"] != "file":
            raise ImageError("not_a_file", f"{brief(location.uri)} is a directory, not a file")
        if info["size"] > max_bytes:
            message = f"{brief(location.uri)} is {info['size']:,} bytes, "
            raise ImageError("too_large", message + over_the_cap(max_bytes))
        with _open_member(archive.files, info["name"], location.uri) as member:
            return member.read(max_bytes + 1)


def _open_member(files: AbstractArchiveFileSystem, name: str, uri: str) -> IO[bytes]:
    if not isinstance(files, TarFileSystem):
        return files.open(name, "rb")
    # A tar can hold devices, FIFOs and links: tarfile gives no reader for the first two
    # (nor links to them), where fsspec's tar reader would fail on the missing reader.
    try:
        member = files.tar.extractfile(name)
    except KeyError as error:  # a link to a member the archive does not hold
        raise FileNotFoundError(name) from error
    if member is None:
        message = f"{brief(uri)} is a device, a FIFO or a link to one: it has no bytes of its own"
        raise ImageError("not_a_file", message)
    return member


@lru_cache(maxsize=OPEN_ARCHIVES)
def _open_archive(scheme: str, source: Location | None) -> _OpenArchive:
    """The archive at `source`, opened once for the reads of all its members (reading a zip's
    or a tar's index costs as much as reading many members)."""
    if source is None:
        reason = f"{scheme}:// URIs name a member and its archive: {scheme}://MEMBER::ARCHIVE"
        raise ImageError("fetch_failed", reason)
    if source.scheme in ("http", "https") or source.archive is not None:
        message = f"{scheme}:// archives are read from files and buckets, not from {source.uri}"
        raise ImageError("unsupported_scheme", message)
    if not source.scheme:
        file: IO[bytes] = _open_regular_file(source.target)
    else:
        fs = _filesystem(source.scheme)
        file = fs.open(strip_protocol(fs, source.target), "rb")
    return _OpenArchive(fsspec.get_filesystem_class(scheme)(fo=file))


@cache
def _filesystem(scheme: str) -> fsspec.AbstractFileSystem:
    """One filesystem per scheme and process: fsspec instances hold connection pools."""
    try:
        fsspec.get_filesystem_class(scheme)
    except ImportError as error:  # fsspec's message names the package, e.g. "Install s3fs"
        message = f"{scheme}:// needs a package that is not installed: {error}"
        raise ImageError("unsupported_scheme", message) from error
    except ValueError as error:  # "Protocol not known"
        raise ImageError("unsupported_scheme", f"no filesystem reads {scheme}: URIs") from error
    return fsspec.filesystem(scheme)


def _file_error(error: Exception, uri: str) -> Exception:
    """What a filesystem's exception means for this image. Each raises its own types
    (gcsfs's HttpError, botocore's); transient ones are marked for a retry."""
    if isinstance(error, ImageError):
        return error
    if isinstance(error, (FileNotFoundError, NotADirectoryError)):
        return ImageError("not_found", f"{brief(uri)} does not exist")
    if _is_transient(error):
        return _Transient(describe(error))
    reason = "permission denied" if isinstance(error, PermissionError) else describe(error)
    return _fetch_failed(uri, reason)


def _is_transient(error: Exception) -> bool:
    if isinstance(error, (ConnectionError, TimeoutError)):
        return True
    status = getattr(error, "status", None) or getattr(error, "code", None)
    return isinstance(status, int) and status in TRANSIENT_STATUSES


# --- For synchronous callers -------------------------------------------------------------


class BackgroundFetcher:
    """A Fetcher on an event loop of its own thread, for callers that are not async (DoFns,
    the benchmark): `submit` returns a concurrent Future of the bytes."""

    def __init__(self, policy: FetchPolicy):
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="fetch", daemon=True)
        self._thread.start()
        self._fetcher = self._run(self._open(policy)).result()

    @staticmethod
    async def _open(policy: FetchPolicy) -> Fetcher:
        return await Fetcher(policy).__aenter__()

    def _run(self, coroutine: Coroutine[Any, Any, Any]) -> Future:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop)

    def submit(self, uri: str) -> Future[bytes]:
        return self._run(self._fetcher.fetch(uri))

    def fetch(self, uri: str) -> bytes:
        return self.submit(uri).result()

    def close(self) -> None:
        if self._loop.is_closed():
            return
        try:
            self._run(self._fetcher.close()).result(timeout=5)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=5)
            if not self._thread.is_alive():
                self._loop.close()

    def __enter__(self) -> BackgroundFetcher:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
