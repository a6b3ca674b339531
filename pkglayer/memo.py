"""An unchanged rebuild answered from the last one, the way make knows a target is up
to date: by stamps, without doing the work again.

A `pkglayer build` of a rootfs directory into `--layers DIR` and/or `--output oci:DIR`
reads nothing but the tree, its settings (command line, configuration, environment),
pkglayer's own code and those output directories, which hold its prior. When none of
them changed since a build that wrote nothing, the build would find every layer where it
is and write nothing again: its answer is that build's. Unchanged means:

- every object of the tree has the lstat the last build's scan trusted (the kept scan's
  rule, scan.same_stamp, outside its racy window), and so has the root;
- every path the package databases were read from finds what it found
  (rootfs.unchanged; those that are objects of the tree, by their stamps);
- every entry below the output directories has the stamp it had when that build ended;
- the command line, the resolved settings, the environment, the working directory and
  the stamps of pkglayer's modules are the same (one key).

A memo is written only by a build that wrote no layer and left the output directories as
it found them (same stamps before and after), so the state it read is the state it left.
Builds with an input that cannot be stamped never use one: an image (--from), --prior,
--config-from, a destination other than an oci: layout, a bootc tree, --no-hash-cache;
nor with --no-memo.

A memo is one file per key beside the kept scans (a header, the sha256 of the rest, the
rest in marshal format: plain data only); anything wrong with it makes it ignored.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
import time

from . import __version__
from .errors import PkglayerError
from .forked import Forked, single_threaded
from .fsutil import evict_least_recent, read_regular, seal, unseal, write_private
from .rootfs import unchanged

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing takes ~3 ms to load: annotations only
    from typing import Any

log = logging.getLogger(__name__)

MEMO_FORMAT = 1
_MAGIC = b"pkglayer-build-memo\n"
MAX_MEMOS = 8
MAX_MEMO_BYTES = 256 << 20
# The lstat fields a stamp compares: mode, ino, dev, nlink, uid, gid, size, mtime, ctime
# (scan.same_stamp's).
_STAMP = struct.Struct("<7Q2q")
# Variables a shell sets for itself, which change with every cd or command: the rest of
# the environment is part of the key, as any of it may reach a build (SOURCE_DATE_EPOCH,
# TMPDIR, XDG_CACHE_HOME, PYTHON*...).
_SHELL_BOOKKEEPING = frozenset(("_", "OLDPWD", "PWD", "SHLVL"))
_CODE_DIR = os.path.dirname(os.path.abspath(__file__))
# From this many objects a forked child lstats part of them on the other core (threads
# only take turns: an lstat is too short to win the GIL back). 13,000 objects: 50 ms,
# 32 with the child.
_SPLIT_FROM = 4096


def _stamp(st: os.stat_result) -> tuple[int, ...]:
    return (*st[:7], st.st_mtime_ns, st.st_ctime_ns)


def _code_stamps() -> list[tuple[str, tuple[int, ...]]]:
    """pkglayer's modules as installed: an edited or upgraded pkglayer is another key."""
    found = []
    pending = [_CODE_DIR]
    while pending:
        directory = pending.pop()
        for entry in os.scandir(directory):
            if entry.name.endswith(".py"):
                found.append((entry.path, _stamp(entry.stat(follow_symlinks=False))))
            elif entry.is_dir(follow_symlinks=False) and entry.name != "__pycache__":
                pending.append(entry.path)
    return sorted(found)


def location_stamps(directories: list[str]) -> dict[str, tuple[Any, ...] | None]:
    """The stamp of every entry below each directory (None: absent), not following links
    below them. What cannot be looked at gets a stamp no other look equals: no memo
    stands for it."""
    stamps: dict[str, tuple[Any, ...] | None] = {}
    pending = list(directories)
    while pending:
        directory = pending.pop()
        try:
            stamps[directory] = _stamp(os.lstat(directory))
            entries = list(os.scandir(directory))
        except (FileNotFoundError, NotADirectoryError):
            stamps.setdefault(directory, None)
            continue
        except OSError as e:
            stamps[directory] = _unlookable(e)
            continue
        for entry in entries:
            try:
                stamps[entry.path] = _stamp(entry.stat(follow_symlinks=False))
            except FileNotFoundError:
                stamps[entry.path] = None
            except OSError as e:
                stamps[entry.path] = _unlookable(e)
            if entry.is_dir(follow_symlinks=False):
                pending.append(entry.path)
    return stamps


def _unlookable(e: OSError) -> tuple[Any, ...]:
    return ("cannot look", e.errno, time.monotonic_ns(), os.urandom(8))


class BuildMemo:
    """The memo of one build's inputs (`key`), in `directory`."""

    def __init__(self, directory: str, key: str, rootfs: str, jobs: int = 1):
        self.directory = directory
        self.key = key
        self.rootfs = rootfs
        self.jobs = jobs
        self.path = os.path.join(directory, f"{key[:32]}.memo")

    @staticmethod
    def for_build(args: Any, settings: Any) -> BuildMemo | None:
        """The memo this command line would use (its key made of everything the build
        reads besides the tree and the outputs), or None when it may not use one."""
        cache = settings.hash_cache_path
        if (
            not cache or args.no_memo or args.rootfs is None or args.source or args.prior or args.config_from
            or args.bootc
        ):
            return None
        rootfs = os.path.abspath(args.rootfs)
        command = sorted((k, repr(v)) for k, v in vars(args).items() if not callable(v))
        parts = (
            MEMO_FORMAT, __version__, command, repr(settings), os.getcwd(), rootfs, os.geteuid(),
            sorted((k, v) for k, v in os.environ.items() if k not in _SHELL_BOOKKEEPING), _code_stamps(),
        )
        key = hashlib.sha256(repr(parts).encode("utf-8", "surrogateescape")).hexdigest()
        return BuildMemo(os.path.join(os.path.dirname(cache), "memos"), key, rootfs, settings.jobs)

    def answer(self) -> dict[str, Any] | None:
        """The last build's answer (its --json), if nothing it read has changed since."""
        started = time.perf_counter()
        try:
            data = read_regular(self.path, MAX_MEMO_BYTES, "build memo", missing_ok=True)
        except PkglayerError as e:
            log.warning("ignoring %s", e)
            return None
        if data is None:
            return None
        try:
            memo = unseal(_MAGIC, data, "build memo", MEMO_FORMAT)
            if memo["key"] != self.key or memo["rootfs"] != self.rootfs:
                return None
            paths = memo["paths"].split("\0") if memo["paths"] else []
            stamps = memo["stamps"]
            if len(stamps) != len(paths) * _STAMP.size:
                raise ValueError("stamps of another shape")
        except Exception as e:  # noqa: BLE001 - any damage at all: build instead
            log.warning("ignoring the build memo %s: %s", self.path, str(e) or type(e).__name__)
            return None
        child = None
        try:
            if _stamp(os.stat(self.rootfs)) != tuple(memo["root"]):
                return None
            if self.jobs > 1 and len(paths) >= _SPLIT_FROM and single_threaded():
                # The second half of the tree to a forked child, the first half (and the
                # outputs) here, and only then its answer.
                cut = len(paths) // 2
                child = Forked(_stamps_unchanged, self.rootfs, paths[cut:], stamps[cut * _STAMP.size :], brief=True)
                paths, stamps = paths[:cut], stamps[: cut * _STAMP.size]
            if not _stamps_unchanged(self.rootfs, paths, stamps):
                return None
            if location_stamps(memo["locations"]) != memo["stamps_of"]:
                return None
            if child is not None and not child.result():
                return None  # changed, or the child failed (then the build looks for itself)
            checked_tree = time.perf_counter()
            # Last: every directory above a path of the trace has been found unchanged
            # by now (the tree's objects, or the trace's earlier paths), so none is
            # looked up through a directory that became a link.
            if not unchanged(self.rootfs, memo["trace"]):
                return None
            checked_databases = time.perf_counter()
        except OSError:
            return None  # what cannot be looked at now is the build's to report
        finally:
            if child is not None:
                child.cancel()
        answer = json.loads(memo["answer"])
        steps = dict.fromkeys(answer["timings"]["steps"], 0.0)
        steps["scan"] = round(checked_tree - started, 3)  # with the outputs' stamps
        steps["database"] = round(checked_databases - checked_tree, 3)
        answer["timings"] = {"steps": steps, "cpu": dict.fromkeys(answer["timings"]["cpu"], 0.0)}
        answer["outputSeconds"] = 0.0
        answer["seconds"] = round(checked_databases - started, 3)
        answer["unchanged"] = True
        return answer

    def record(self, answer: dict[str, Any], kept: Any, locations: list[str],
               before: dict[str, tuple[Any, ...] | None]) -> None:
        """Keep `answer` for this key when the build (its kept scan `kept`) wrote nothing
        and found the output directories as it left them (`before`: their stamps at its
        start)."""
        from .scan import RACY_SECONDS

        scan = kept.scan if kept is not None else None
        if (answer["written"] or scan is None or kept.trace is None or kept.trace_racy or scan.root is None
                or kept.root != self.rootfs):
            return
        after = location_stamps(locations)
        if after != before:
            return
        # An object changed this close before the walk may change again without its
        # lstat changing: the next build must read it (scan.walk's racy window).
        racy_ns = (scan.started - RACY_SECONDS) * 1e9
        objects = scan.objects.values()
        if scan.root.st_ctime_ns >= racy_ns or any(o.st.st_ctime_ns >= racy_ns for o in objects):
            return
        memo = {
            "format": MEMO_FORMAT,
            "version": __version__,
            "key": self.key,
            "rootfs": self.rootfs,
            "root": _stamp(scan.root),
            "paths": "\0".join(scan.objects),
            "stamps": b"".join(_STAMP.pack(*_stamp(o.st)) for o in objects),
            # What the databases were read from, less the tree's own objects: their
            # stamps (a superset of what the trace notes) are checked anyway.
            "trace": {path: found for path, found in kept.trace.items() if path not in scan.objects},
            "locations": locations,
            "stamps_of": after,
            "answer": json.dumps(answer),
        }
        data = seal(_MAGIC, memo)
        if len(data) > MAX_MEMO_BYTES:
            return
        try:
            write_private(self.path, data)
            evict_least_recent(self.directory, ".memo", MAX_MEMOS, keep=self.path)
        except OSError as e:
            log.warning("could not keep the build memo in %s: %s", self.directory, e.strerror)

    def forget(self) -> None:
        """A build that is not answered from this memo may change what it vouches for."""
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        except OSError as e:
            log.warning("could not remove the build memo %s: %s", self.path, e.strerror)


def _stamps_unchanged(rootfs: str, paths: list[str], stamps: bytes) -> bool:
    """Whether every object has the stamp recorded for it."""
    top = rootfs + "/"
    lstat = os.lstat
    try:
        for path, was in zip(paths, _STAMP.iter_unpack(stamps)):
            st = lstat(top + path)
            # st[:7] then the two times: one tuple compare per object
            if st[:7] != was[:7] or st.st_mtime_ns != was[7] or st.st_ctime_ns != was[8]:
                return False
    except (FileNotFoundError, NotADirectoryError):
        return False  # gone, or a directory above it replaced
    return True
