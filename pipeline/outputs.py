"""The output folder: a run's results go in all at once when it has finished, one run at a time.

A run writes under a staging folder inside the output folder, `.artstyle-tmp-<run id>/` (the
same filesystem, so that moving a file out of it is a rename on a local disk), and moves
its results in place only when the pipeline has finished, summary.json last. Until then
the folder's earlier results stay as they were, however the run ends; a staging folder
left by a run that died is removed by the next run into the folder.

`.artstyle-files.json` lists the results the tool wrote in the folder. A later run replaces
or removes those and no others. A file that looks like a result (`predictions-*.parquet`,
`summary.json`, ...) but is not on record (an earlier version's, or one copied in) would be
read with the run's results by any reader of `predictions-*.parquet`: it stops the run at
start-up, unless the run is told to replace it (--overwrite). The report command
(`python -m pipeline.report`) publishes the same way, its page and pictures alone.

Beam's file writers read a `[` in a path as a glob, and cannot write under one: such a
folder is refused at start-up. Elsewhere the folder's path is taken as it is, never as a
glob: its files are listed, and matched by name.

`.artstyle-lock` keeps a second run out while one is live. On a local disk the kernel holds
it (flock) and releases it when the process ends, however it ends. Object stores (gs://,
s3://) have no locks: there it is an object naming its holder, rewritten every HEARTBEAT_S
while the run lives, and one not rewritten for STALE_AFTER_S was left by a run that died.
Two runs that start within a moment of each other can both take that one: it guards
against mistakes, not against races.
"""

from __future__ import annotations

import fcntl
import fnmatch
import json
import logging
import os
import posixpath
import secrets
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace

import fsspec
from fsspec.implementations.local import LocalFileSystem

from pipeline.interrupts import interrupts_deferred
from transforms.embeddings import EMBEDDING_FILES

SUMMARY_FILE = "summary.json"
REPORT_PAGE = "report.html"
REPORT_FILES = "report_files"  # a folder: the report's pictures
PREDICTION_FILES = "predictions-*.parquet"
METRICS_FILES = "metrics-*.parquet"
RESULT_PATTERNS = (
    PREDICTION_FILES,
    METRICS_FILES,
    EMBEDDING_FILES,
    SUMMARY_FILE,
    REPORT_PAGE,
    REPORT_FILES,
)
MOST_NAMES_SHOWN = 5  # of the files a refusal names
FILES_RECORD = ".artstyle-files.json"
RECORD_FORMAT = "artstyle.outputs/1"
LOCK_FILE = ".artstyle-lock"
STAGING_PREFIX = ".artstyle-tmp-"
HEARTBEAT_S = 60.0
STALE_AFTER_S = 600.0


class OutputError(ValueError):
    """--output cannot take a run's results; raised before the pipeline starts."""


@dataclass(frozen=True)
class Results:
    """What one command publishes in the folder: the patterns of its files (the earlier of
    which it replaces), and the file it moves last, whose presence says the rest is whole."""

    patterns: tuple[str, ...]
    last: str

    def matches(self, name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, pattern) for pattern in self.patterns)


RUN_RESULTS = Results(RESULT_PATTERNS, SUMMARY_FILE)
REPORT_RESULTS = Results((REPORT_PAGE, REPORT_FILES), REPORT_PAGE)


@dataclass(frozen=True)
class RunFiles:
    """A run's result files: the folder they are in (a URL) and their names there."""

    folder: str
    names: frozenset[str]

    def named(self, pattern: str) -> list[str]:
        """The names that match `pattern`, sorted."""
        return sorted(name for name in self.names if fnmatch.fnmatchcase(name, pattern))

    def url(self, name: str) -> str:
        return f"{self.folder}/{name}"


@dataclass(frozen=True)
class Holder:
    """The run that holds a folder, as a run kept out of it is told."""

    run_id: str
    host: str
    pid: int
    since: float  # seconds since the epoch
    refreshed: float

    @classmethod
    def this_process(cls, run_id: str) -> Holder:
        now = time.time()
        return cls(run_id, socket.gethostname(), os.getpid(), now, now)

    @classmethod
    def from_bytes(cls, data: bytes) -> Holder | None:
        """None for anything but a holder's JSON (an empty or half-written lock)."""
        try:
            return cls(**json.loads(data))
        except (ValueError, TypeError):
            return None

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self)).encode()

    def describe(self) -> str:
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.since))
        return f"pid {self.pid} on {self.host}, since {started}"

    def is_stale(self, now: float) -> bool:
        """Not refreshed for STALE_AFTER_S, or its process is gone from this very host."""
        if now - self.refreshed > STALE_AFTER_S:
            return True
        return self.host == socket.gethostname() and not _process_exists(self.pid)


class _Busy(Exception):
    def __init__(self, holder: Holder | None):
        super().__init__()
        self.holder = holder


class KernelLock:
    """flock on a file in the folder. The file stays when released: removing it would race
    with a run that has just opened it."""

    def __init__(self, path: str, holder: Holder):
        self._path, self._holder = path, holder
        self._fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self._path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = Holder.from_bytes(os.pread(fd, 4096, 0))
            os.close(fd)
            raise _Busy(holder) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, self._holder.to_bytes(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # and with it the flock
            self._fd = None


class ObjectLock:
    """An object naming its holder, for filesystems without locks (see the module's
    docstring); a daemon thread rewrites it every HEARTBEAT_S while the run lives."""

    def __init__(self, fs: fsspec.AbstractFileSystem, path: str, holder: Holder):
        self._fs, self._path, self._holder = fs, path, holder
        self._stop = threading.Event()

    def acquire(self) -> None:
        current = self._current()
        if current is not None and not current.is_stale(time.time()):
            raise _Busy(current)
        self._fs.pipe_file(self._path, self._holder.to_bytes())
        current = self._current()  # another run's write may have landed after ours
        if current is None or current.run_id != self._holder.run_id:
            raise _Busy(current)
        threading.Thread(target=self._keep_fresh, daemon=True, name="artstyle-lock").start()

    def release(self) -> None:
        self._stop.set()
        current = self._current()
        if current is not None and current.run_id == self._holder.run_id:
            self._fs.rm(self._path)

    def _current(self) -> Holder | None:
        try:
            return Holder.from_bytes(self._fs.cat_file(self._path))
        except FileNotFoundError:
            return None

    def _keep_fresh(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            self._holder = replace(self._holder, refreshed=time.time())
            try:
                self._fs.pipe_file(self._path, self._holder.to_bytes())
            except OSError as error:
                logging.warning("artstyle: could not refresh %s: %s", self._path, error)


class OutputFolder:
    """--output, held by this run: see the module's docstring. Beam writes to `staging`."""

    def __init__(self, url: str, results: Results = RUN_RESULTS, overwrite: bool = False):
        self.url = url.rstrip("/") or url
        self._results, self._overwrite = results, overwrite
        self._fs, self._path = _filesystem_of(self.url)
        run_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(4)}"
        self.staging = f"{self.url}/{STAGING_PREFIX}{run_id}"
        self._staging_path = f"{self._path}/{STAGING_PREFIX}{run_id}"
        holder, lock_path = Holder.this_process(run_id), f"{self._path}/{LOCK_FILE}"
        local = isinstance(self._fs, LocalFileSystem)
        self._lock = (
            KernelLock(lock_path, holder) if local else ObjectLock(self._fs, lock_path, holder)
        )
        self._had_results = False

    @classmethod
    @contextmanager
    def claim(
        cls, url: str, results: Results = RUN_RESULTS, overwrite: bool = False
    ) -> Iterator[OutputFolder]:
        """The folder, checked, created and locked, with any staging folder of a dead run
        removed; on leaving, this run's staging folder is removed and the lock released.
        `results`: what this command publishes; `overwrite`: whether it may replace files
        that look like those but are not on record as the tool's."""
        folder = cls(url, results, overwrite)
        folder._open()
        try:
            yield folder
        finally:
            folder.release()

    def _open(self) -> None:
        if "[" in self.url:
            raise OutputError(
                f"--output {self.url}: Beam's file writers read '[' in a path as a glob and "
                "cannot write under it: choose a folder without '['"
            )
        if self._fs.isfile(self._path):
            raise OutputError(f"--output {self.url} is a file, not a folder")
        try:
            self._fs.makedirs(self._path, exist_ok=True)
            self._lock.acquire()
        except _Busy as busy:
            holder = f" ({busy.holder.describe()})" if busy.holder else ""
            raise OutputError(
                f"another run is writing to {self.url}{holder}: wait for it to end, or choose "
                "another --output"
            ) from None
        except OSError as error:
            raise OutputError(
                f"--output {self.url} cannot be written ({error.strerror or error})"
            ) from None
        try:
            self._check_unrecorded()
            for name in self._names_in(self._path):
                if name.startswith(STAGING_PREFIX):
                    self._fs.rm(self._in_folder(name), recursive=True)
            self._fs.makedirs(self._staging_path, exist_ok=True)
            self._had_results = bool(self._recorded_results())
        except BaseException:
            self._lock.release()
            raise

    def _check_unrecorded(self) -> None:
        """Stops here where the folder holds files that look like what this command
        publishes but that the tool has no record of writing, unless it may replace them."""
        unrecorded = self._unrecorded_results()
        if not unrecorded or self._overwrite:
            return
        shown = ", ".join(unrecorded[:MOST_NAMES_SHOWN])
        more = len(unrecorded) - MOST_NAMES_SHOWN
        if more > 0:
            shown += f" and {more} more"
        raise OutputError(
            f"{self.url} holds files that look like artstyle's results but are not on record "
            f"as its own ({shown}): move them away, or pass --overwrite to replace them"
        )

    @property
    def interrupted_message(self) -> str:
        if self._had_results:
            return (
                f"artstyle: interrupted; no results were written (the earlier ones in {self.url} "
                "are as they were)"
            )
        return f"artstyle: interrupted; no results were written to {self.url}"

    def staged_results(self) -> RunFiles:
        """This run's results, in the staging folder until `publish`."""
        self._fs.invalidate_cache(self._staging_path)  # Beam wrote there, not through fsspec
        return RunFiles(self.staging, frozenset(self._result_names(self._staging_path)))

    def published_results(self) -> RunFiles:
        """The results in the folder: those on record as the tool's, or, in a folder without
        a record (an earlier version's), every file that looks like one."""
        recorded = self._recorded_results()
        if not recorded and not self._fs.exists(self._in_folder(FILES_RECORD)):
            recorded = self._result_names(self._path)
        return RunFiles(self.url, frozenset(recorded))

    def publish(self) -> None:
        """Moves the staged results in place, the `last` of them last, and removes the
        earlier results of the same kinds that these do not replace (with --overwrite, those
        not on record too). Ctrl-C waits until it is done."""
        staged = set(self.staged_results().names)
        last = self._results.last
        if last not in staged:
            raise RuntimeError(f"the run wrote no {last} to {self.staging}")
        recorded = self._recorded_results()
        others = set(self._unrecorded_results()) if self._overwrite else set()
        earlier = {name for name in recorded | others if self._results.matches(name)}
        kept = recorded - earlier
        with interrupts_deferred():
            self._record(recorded | earlier | staged)  # what a crash below leaves is on record
            if last in earlier:  # without it, the folder's results are incomplete
                self._fs.rm(self._in_folder(last), recursive=True)
            for name in sorted(staged & earlier - {last}):  # a folder is not merged
                self._fs.rm(self._in_folder(name), recursive=True)
            for name in sorted(staged - {last}):
                self._fs.mv(self._in_staging(name), self._in_folder(name), recursive=True)
            for name in sorted(earlier - staged):
                self._fs.rm(self._in_folder(name), recursive=True)
            self._fs.mv(self._in_staging(last), self._in_folder(last), recursive=True)
            self._record(kept | staged)

    def others_files(self) -> list[str]:
        """Files in the folder that look like results but that the tool did not write."""
        self._fs.invalidate_cache(self._path)
        return sorted(self._result_names(self._path) - self._recorded_results())

    def _unrecorded_results(self) -> list[str]:
        """`others_files` of the kinds this command publishes."""
        return [name for name in self.others_files() if self._results.matches(name)]

    def _result_names(self, folder: str) -> set[str]:
        """The names in `folder` that match RESULT_PATTERNS."""
        return {name for name in self._names_in(folder) if RUN_RESULTS.matches(name)}

    def _names_in(self, folder: str) -> list[str]:
        """The names in `folder`, listed: its path is never read as a glob."""
        return [posixpath.basename(path.rstrip("/")) for path in self._fs.ls(folder, detail=False)]

    def release(self) -> None:
        """Removes this run's staging folder and releases the lock; never raises, as it also
        runs when Ctrl-C ends the process (a staging folder left here goes with the next run)."""
        try:
            if self._fs.exists(self._staging_path):
                self._fs.rm(self._staging_path, recursive=True)
        except OSError as error:
            logging.warning("artstyle: could not remove %s: %s", self.staging, error)
        try:
            self._lock.release()
        except OSError as error:
            logging.warning("artstyle: could not release the lock on %s: %s", self.url, error)

    def _recorded_results(self) -> set[str]:
        """The results on record as the tool's that are still there. A record edited by hand
        can name nothing but results in this folder."""
        try:
            record = json.loads(self._fs.cat_file(self._in_folder(FILES_RECORD)))
            names = set(record["files"])
        except FileNotFoundError:
            return set()
        except (ValueError, KeyError, TypeError):
            logging.warning(
                "artstyle: ignoring %s/%s: not a record of files", self.url, FILES_RECORD
            )
            return set()
        return {
            name
            for name in names
            if isinstance(name, str)
            and name == posixpath.basename(name)
            and RUN_RESULTS.matches(name)
            and self._fs.exists(self._in_folder(name))
        }

    def _record(self, names: set[str]) -> None:
        """Written beside the results, then moved: a rename on a local disk, never half a file."""
        record = {"format": RECORD_FORMAT, "files": sorted(names)}
        self._fs.pipe_file(self._in_staging(FILES_RECORD), json.dumps(record, indent=2).encode())
        self._fs.mv(self._in_staging(FILES_RECORD), self._in_folder(FILES_RECORD))

    def _in_folder(self, name: str) -> str:
        return f"{self._path}/{name}"

    def _in_staging(self, name: str) -> str:
        return f"{self._staging_path}/{name}"


def _filesystem_of(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    try:
        fs, path = fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as error:  # a filesystem's package missing, or unknown
        raise OutputError(f"--output {url}: {error}") from None
    return fs, path.rstrip("/") or path


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's
    return True
