"""The daemon's main loop: roots' state, debounced rescans, prebuilds, builds, signals,
sd_notify and logging. Everything that touches the state runs on the event loop; scans
and builds run in a thread pool (tar, compression and hashing release the GIL, and
`build()` fans layer writes out over `jobs` threads of its own).

Nothing can wedge it for good (docs/security.md): a reload reads the configuration in a
thread of its own, with a time limit, never in the build pool; every piece of pool work
is tracked, and `health` reports work that has not progressed for `stall-timeout`
seconds as stuck; SIGTERM waits at most `stop-timeout` seconds for work in progress and
then exits without it (its temporary blob files are removed at the next start).
"""

from __future__ import annotations

import asyncio
import collections
import ctypes
import gc
import itertools
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import aiofiles

from .. import __version__
from ..errors import HistoryError, PkglayerError, TreeChangedError
from ..fsutil import read_regular, write_file_atomic
from ..history import History, dumps_history, parse_history
from ..rootfs import Rootfs
from ..sources import open_source
from .cache import LayerCache
from .changes import WatchedScans
from .config import DaemonConfig, RootConfig, load_daemon_config
from .notify import Notifier, watchdog_interval
from .watch import Watcher, transaction_running, watch_targets

log = logging.getLogger("pkglayer.daemon")

_MAX_BUILD_RECORDS = 200
_MAX_RECORD_BYTES = 64 << 20
# Reading and checking the configuration takes milliseconds; a file system that hangs
# must not take the reload (or anything else) with it.
RELOAD_TIMEOUT = 10.0
# After a package manager closes its lock file: long enough for the last writes of its
# exit to be queued behind it.
RELEASE_DELAY = 0.05
# States in which a root has nothing pending: what it shows is what its tree holds now.
SETTLED = ("ready", "idle", "error", "missing")
_PRIORITIES = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}


class _JournalFormatter(logging.Formatter):
    """One line per record. Under systemd ($JOURNAL_STREAM) a "<N>" syslog priority
    prefix, which journald turns into the entry's priority; the journal adds time and
    identifier. Elsewhere "pkglayer[PID]: level: message"."""

    def __init__(self, journal: bool):
        super().__init__()
        self.journal = journal

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.exc_info:
            message += " | " + self.formatException(record.exc_info).replace("\n", " | ")
        message = message.replace("\n", " ")
        if self.journal:
            return f"<{_PRIORITIES.get(record.levelno, 6)}>{message}"
        return f"pkglayer[{os.getpid()}]: {record.levelname.lower()}: {message}"


def setup_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_JournalFormatter(bool(os.environ.get("JOURNAL_STREAM"))))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # watchdog logs every inotify event at debug level
    logging.getLogger("watchdog").setLevel(max(logging.INFO, root.level))


class Cancelled(Exception):
    """Raised from a build's progress callback when the daemon stops: `build()` starts no
    more layers, lets the ones being written finish, and drops nothing half-written."""


@dataclass
class Work:
    """A piece of work running in a thread: what it is, and when it last made progress
    (a build reports each phase, file and layer; anything else only when it ends)."""

    what: str
    root: str | None
    started: float = field(default_factory=time.monotonic)
    progressed: float = field(default_factory=time.monotonic)
    phase: str | None = None

    def to_json(self, now: float) -> dict[str, Any]:
        return {"what": self.what, "root": self.root, "phase": self.phase,
                "seconds": round(now - self.started, 1), "idleSeconds": round(now - self.progressed, 1)}


@dataclass
class Inspection:
    exists: bool
    packages: dict[str, str] = field(default_factory=dict)  # "name:arch" -> package key
    format: str | None = None
    db_paths: list[str] = field(default_factory=list)
    targets: dict[str, str | None] = field(default_factory=dict)
    error: str | None = None


def inspect_root(cfg: RootConfig) -> Inspection:
    """Read a root's package list and what to watch (runs in a worker thread)."""
    targets, db_paths = watch_targets(cfg.path, cfg.settings.package_format)
    if not os.path.isdir(cfg.path):
        return Inspection(False, targets=targets, error=f"root directory {cfg.path} does not exist")
    try:
        with Rootfs(cfg.path) as rootfs:
            source = open_source(rootfs, cfg.settings.package_format)
            packages = source.packages() if source else []
            fmt = source.format if source else None
    except PkglayerError as e:
        return Inspection(True, db_paths=db_paths, targets=targets, error=str(e))
    return Inspection(
        True,
        packages={f"{p.name}:{p.arch}": p.key for p in packages},
        format=fmt,
        db_paths=db_paths,
        targets=targets,
    )


@dataclass
class BuildJob:
    id: str
    root: str
    kind: str  # "build" (image/layers output) or "prebuild" (cache only)
    state: str = "queued"  # queued, running, succeeded, failed, cancelled
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    error: str | None = None
    result: dict[str, Any] | None = None
    done: asyncio.Event = field(default_factory=asyncio.Event)

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "root": self.root,
            "kind": self.kind,
            "state": self.state,
            "created": self.created,
            "started": self.started,
            "finished": self.finished,
            "error": self.error,
            "result": self.result,
        }


@dataclass
class RootState:
    config: RootConfig
    exists: bool = False
    format: str | None = None
    packages: dict[str, str] = field(default_factory=dict)
    db_paths: list[str] = field(default_factory=list)
    error: str | None = None
    activity: str | None = "starting"  # what runs now: scanning, prebuilding, building
    events: int = 0
    last_event: str | None = None
    rescans: int = 0
    prebuilds: int = 0
    builds: int = 0
    layers_written: int = 0
    layers_from_cache: int = 0
    waiting_for: str | None = None  # a running package transaction
    changes: dict[str, list[str]] = field(default_factory=dict)
    last_prebuild: dict[str, Any] | None = None
    last_build: dict[str, Any] | None = None
    # the layer plan of the last prebuild or build: the next one keeps it stable (the
    # outputs' own history only says what was last *written* there)
    plan: History | None = None
    progress: dict[str, Any] | None = None
    dirty: bool = False  # rescan wanted
    prebuild_wanted: bool = False
    timer: asyncio.TimerHandle | None = None
    released: bool = False  # the pending timer follows a lock file's close (RELEASE_DELAY)
    queue: collections.deque[BuildJob] = field(default_factory=collections.deque)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    worker: asyncio.Task[None] | None = None
    removed: bool = False
    started: bool = False  # its initial inspection is done and its first work is due
    # the last scan and a watch of what changed since (made by the first build)
    scans: WatchedScans | None = None

    def drop_scans(self) -> None:
        if self.scans is not None:
            self.scans.close()
            self.scans = None

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def pending(self) -> bool:
        return self.timer is not None or self.dirty or self.prebuild_wanted or bool(self.queue)

    @property
    def failed_prebuild(self) -> str | None:
        last = self.last_prebuild
        return last.get("error") if last and not last.get("ok") else None

    @property
    def state(self) -> str:
        """One word for scripts (README, "ctl status"): starting, scanning, prebuilding,
        building, waiting (a change or request is pending), or settled (SETTLED): ready,
        idle, error, missing."""
        if not self.started:
            return "starting"
        if self.activity:
            return self.activity
        if self.pending:
            return "waiting"
        if not self.exists:
            return "missing"
        if self.error or (self.config.auto_build and self.failed_prebuild):
            return "error"
        if self.config.auto_build and self.last_prebuild:
            return "ready"
        return "idle"

    def summary(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "path": self.config.path,
            "state": self.state,
            "exists": self.exists,
            "format": self.format,
            "packages": len(self.packages),
            "pending": self.pending,
            "autoBuild": self.config.auto_build,
            "output": self.config.output,
            "layers": self.config.layers,
            "layersReady": len((self.last_prebuild or {}).get("layers") or []) if self.state == "ready" else None,
            "events": self.events,
            "rescans": self.rescans,
            "prebuilds": self.prebuilds,
            "builds": self.builds,
            "layersWritten": self.layers_written,
            "layersFromCache": self.layers_from_cache,
            "error": self.error or (self.failed_prebuild if self.config.auto_build else None),
            "lastBuild": self.last_build,
        }

    def detail(self) -> dict[str, Any]:
        d = self.summary()
        d.update(
            {
                "compression": self.config.settings.compression_spec,
                "maxLayers": self.config.settings.max_layers,
                "debounce": self.config.debounce,
                "databasePaths": self.db_paths,
                "lastEvent": self.last_event,
                "waitingFor": self.waiting_for,
                "changes": self.changes,
                "lastPrebuild": self.last_prebuild,
                "progress": self.progress,
                "queued": [j.id for j in self.queue],
                "packageList": sorted(self.packages.values()),
            }
        )
        return d


class Daemon:
    def __init__(self, config: DaemonConfig):
        self.config = config
        self.roots: dict[str, RootState] = {}
        self.builds: dict[str, BuildJob] = {}
        self.cache: LayerCache | None = None
        self.notifier = Notifier()
        self.stopping = False
        self.ready = False
        self.started = time.time()
        self._ids = itertools.count(1)
        self._stop = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pool = ThreadPoolExecutor(max_workers=config.parallel_builds + 2, thread_name_prefix="pkglayer-work")
        # Reloads have a thread of their own: a configuration that cannot be read must
        # not take a build's thread (nor builds a reload's).
        self._reload_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pkglayer-reload")
        self.work: dict[int, Work] = {}
        self._slots = asyncio.Semaphore(config.parallel_builds)
        self._no_collections = CollectionsPaused()
        self._release_free_memory = MemoryRelease()
        self.watcher: Watcher | None = None
        self.api = None

    # ---------------------------------------------------------------- life

    async def run(self) -> int:
        from .api import ApiServer

        self._loop = asyncio.get_running_loop()
        loop = self._loop
        cfg = self.config
        os.makedirs(cfg.state_dir, mode=0o700, exist_ok=True)
        self._status("opening the layer cache")
        self.cache = await self._run("opening the layer cache", None, LayerCache, cfg.cache_dir, cfg.cache_max_size)
        checked = await self._run("checking the layer cache", None, self.cache.check)
        log.info(
            "layer cache %s: %d layers; removed %d stale temp files, %d orphan blobs, %d broken entries",
            cfg.cache_dir, checked["entries"], checked["temps"], checked["orphans"], checked["dropped"],
        )
        self.watcher = Watcher(loop, self._on_event)
        self.watcher.start()
        self.api = ApiServer(self)
        await self.api.start(cfg.socket, cfg.socket_group)
        log.info("listening on %s", cfg.socket)
        for sig, handler in ((signal.SIGTERM, self.request_stop), (signal.SIGINT, self.request_stop),
                             (signal.SIGHUP, self._on_sighup)):
            loop.add_signal_handler(sig, handler)

        self._status(f"initial scan of {len(cfg.roots)} roots")
        pinger = asyncio.create_task(self._watchdog_pings())
        starting = asyncio.ensure_future(asyncio.gather(*(self._add_root(r) for r in cfg.roots)))
        stop = asyncio.ensure_future(self._stop.wait())
        # A stop request is served during the initial scans too (a root may hang them).
        await asyncio.wait({starting, stop}, return_when=asyncio.FIRST_COMPLETED)
        if starting.done() and not self.stopping:
            starting.result()
            for state in self.roots.values():
                state.started = True
                state.wake.set()
            self.ready = True
            self.notifier.notify(READY=1, STATUS=self._status_line())
            log.info("ready: %s", self._status_line())
        await stop
        abandoned = await self._shutdown()
        pinger.cancel()
        if abandoned:
            # Threads stuck in a system call cannot be stopped from Python, and the
            # interpreter would wait for them at exit: leave now. What they leave behind
            # (temp files, an index transaction) is what a crash leaves, and the next
            # start cleans it up.
            logging.shutdown()
            os._exit(0)
        return 0

    def request_stop(self) -> None:
        if self.stopping:
            return
        self.stopping = True
        log.info("stopping: no new work; work in progress has %g s to finish", self.config.stop_timeout)
        self.notifier.notify(STOPPING=1, STATUS="stopping")
        self._stop.set()

    async def _shutdown(self) -> list[str]:
        """Stop within `stop-timeout`: queued builds are cancelled, running ones stop at
        their next layer (Cancelled), and work still running at the deadline is abandoned
        (its jobs marked cancelled). Returns what was abandoned."""
        assert self.api is not None and self.watcher is not None and self._loop is not None
        deadline = self._loop.time() + self.config.stop_timeout
        self.watcher.stop()
        for state in self.roots.values():
            if state.timer:
                state.timer.cancel()
                state.timer = None
            for job in state.queue:
                self._finish(job, "cancelled", error="the daemon stopped before the build started")
            state.queue.clear()
            state.wake.set()
        workers = [s.worker for s in self.roots.values() if s.worker]
        if workers:
            await asyncio.wait(workers, timeout=max(0.0, deadline - self._loop.time()))
        abandoned = [w.what for w in self.work.values()]
        if abandoned:
            log.warning("stopping: %s did not finish within %g s; exiting without it (its temporary files "
                        "are removed at the next start)", "; ".join(abandoned), self.config.stop_timeout)
            for job in self.builds.values():
                if not job.done.is_set():
                    self._finish(job, "cancelled", error="the daemon stopped during the build")
        await self.api.stop()
        for state in self.roots.values():
            state.drop_scans()
        if not abandoned:
            self._pool.shutdown(wait=True)
            self._reload_pool.shutdown(wait=True)
            if self.cache:
                self.cache.close()
        self.notifier.close()
        log.info("stopped")
        return abandoned

    async def _run(self, what: str, root: str | None, fn: Callable[..., Any], *args: Any,
                   reports: bool = False) -> Any:
        """fn(*args) in the pool, tracked in `work` (for `health` and the shutdown).
        With `reports`, fn gets the Work as a last argument, to record its progress."""
        item = Work(what, root)
        return await self._track(item, self._pool, fn, *args, *((item,) if reports else ()))

    def _track(self, item: Work, pool: ThreadPoolExecutor, fn: Callable[..., Any], *args: Any) -> asyncio.Future:
        """Submit fn(*args) and keep `item` in `work` until the thread is done: also when
        whoever awaits it has given up (a timeout, a stop)."""
        assert self._loop is not None
        loop = self._loop
        self.work[id(item)] = item
        future = pool.submit(fn, *args)
        future.add_done_callback(lambda _: loop.call_soon_threadsafe(self.work.pop, id(item), None))
        return asyncio.wrap_future(future)

    def stuck(self) -> list[Work]:
        """Work that has not progressed for `stall-timeout` seconds."""
        now = time.monotonic()
        return [w for w in self.work.values() if now - w.progressed > self.config.stall_timeout]

    # ------------------------------------------------- small files (aiofiles)

    def _record_path(self, name: str) -> str:
        return os.path.join(self.config.state_dir, "roots", f"{name}.json")

    def _stage_dir(self, name: str) -> str:
        """The OCI layout of root `name` that an output other than oci: is published from."""
        return os.path.join(self.config.state_dir, "outputs", name)

    async def _load_record(self, state: RootState) -> None:
        """The last build of a root and its layer plan survive restarts
        (state-dir/roots/NAME.json)."""
        path = self._record_path(state.name)
        try:
            raw = await self._run(f"reading {path}", state.name, read_regular, path, _MAX_RECORD_BYTES,
                                  "root record", PkglayerError, True)
            if raw is None:
                return
            data = json.loads(raw)
        except (PkglayerError, ValueError, RecursionError) as e:
            log.warning("root %s: ignoring unreadable %s: %s", state.name, path, e)
            return
        if isinstance(data, dict) and isinstance(data.get("lastBuild"), dict):
            state.last_build = data["lastBuild"]
        if isinstance(data, dict) and isinstance(data.get("plan"), dict):
            try:
                state.plan = parse_history(json.dumps(data["plan"]).encode(), f"{path}: plan")
            except HistoryError as e:
                log.warning("root %s: ignoring the saved plan: %s", state.name, e)

    async def _save_record(self, state: RootState) -> None:
        assert self._loop is not None
        path = self._record_path(state.name)
        plan = json.loads(dumps_history(state.plan)) if state.plan else None
        data = (json.dumps({"lastBuild": state.last_build, "plan": plan}, indent=2) + "\n").encode()

        def save() -> None:
            os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
            write_file_atomic(path, data, mode=0o600)

        try:
            await self._run(f"saving {path}", state.name, save)
        except OSError as e:
            log.warning("root %s: cannot save %s: %s", state.name, path, e)

    async def memory(self) -> dict[str, int]:
        """VmRSS and VmHWM (peak) of this process in bytes, from /proc/self/status."""
        figures = {}
        try:
            async with aiofiles.open("/proc/self/status") as f:
                for line in (await f.read()).splitlines():
                    key, _, value = line.partition(":")
                    if key in ("VmRSS", "VmHWM"):
                        figures[key] = int(value.split()[0]) * 1024
        except (OSError, ValueError):
            pass
        return figures

    async def _watchdog_pings(self) -> None:
        interval = watchdog_interval()
        if interval is None:
            return
        log.info("watchdog: pinging every %.1f s", interval)
        while True:
            self.notifier.notify(WATCHDOG=1)
            await asyncio.sleep(interval)

    def _status(self, text: str) -> None:
        self.notifier.notify(STATUS=text)

    def _status_line(self) -> str:
        states = collections.Counter(s.state for s in self.roots.values())
        parts = ", ".join(f"{n} {k}" for k, n in sorted(states.items()))
        return f"{len(self.roots)} roots" + (f" ({parts})" if parts else "")

    # -------------------------------------------------------------- reload

    def _on_sighup(self) -> None:
        asyncio.ensure_future(self.reload())

    async def reload(self) -> bool:
        assert self._loop is not None
        path = self.config.path
        if path is None or self.stopping:
            return False
        if any(w.what.startswith("reloading ") for w in self.work.values()):
            log.error("reload: the previous reload is still reading %s; ignoring this one", path)
            return False
        self.notifier.notify(RELOADING=1, MONOTONIC_USEC=int(time.monotonic() * 1e6), STATUS="reloading")
        future = self._track(Work(f"reloading {path}", None), self._reload_pool, load_daemon_config, path)
        try:
            new = await asyncio.wait_for(future, RELOAD_TIMEOUT)
        except TimeoutError:
            log.error("reload: reading %s did not finish within %g s; keeping the running configuration",
                      path, RELOAD_TIMEOUT)
            self.notifier.notify(READY=1, STATUS=f"{self._status_line()}; reload failed: {path} cannot be read")
            return False
        except PkglayerError as e:
            log.error("reload: keeping the running configuration: %s", e)
            self.notifier.notify(READY=1, STATUS=f"{self._status_line()}; reload failed: {e}")
            return False
        for key in ("socket", "socket_group", "state_dir", "cache_max_size", "parallel_builds"):
            if getattr(new, key) != getattr(self.config, key):
                log.warning("reload: daemon.%s changed; it takes effect at the next restart", key.replace("_", "-"))
        setup_logging(new.log_level)
        old_roots = {r.name: r for r in self.config.roots}
        new_roots = {r.name: r for r in new.roots}
        self.config = DaemonConfig(**{**self.config.__dict__, "roots": new.roots, "log_level": new.log_level,
                                      "jobs": new.jobs, "stall_timeout": new.stall_timeout,
                                      "stop_timeout": new.stop_timeout})
        for name in old_roots.keys() - new_roots.keys():
            await self._remove_root(name)
        added = []
        for name, cfg in new_roots.items():
            if name not in old_roots:
                added.append(self._add_root(cfg, trigger=True))
            elif cfg != old_roots[name]:
                log.info("root %s: configuration changed", name)
                state = self.roots[name]
                state.config = cfg
                self._mark_dirty(state)
        await asyncio.gather(*added)
        log.info("reloaded %s: %s", path, self._status_line())
        self.notifier.notify(READY=1, STATUS=self._status_line())
        return True

    # --------------------------------------------------------------- roots

    async def _add_root(self, cfg: RootConfig, trigger: bool = False) -> None:
        """Add a root and inspect it. Its first work (a prebuild) is due at once with
        `trigger` (a reload), else when run() starts every root together."""
        assert self._loop is not None
        state = RootState(cfg)
        self.roots[cfg.name] = state
        await self._load_record(state)
        await self._inspect(state, initial=True)
        state.activity = None
        state.prebuild_wanted = cfg.auto_build and state.exists and not state.error
        state.worker = asyncio.create_task(self._worker(state))
        log.info(
            "root %s: %s, %s",
            cfg.name, cfg.path,
            state.error or f"{len(state.packages)} {state.format or 'no'} packages",
        )
        if trigger:
            state.started = True
            state.wake.set()

    async def _remove_root(self, name: str) -> None:
        state = self.roots.pop(name, None)
        if state is None:
            return
        log.info("root %s: removed from the configuration", name)
        state.removed = True
        state.drop_scans()
        if state.timer:
            state.timer.cancel()
        for job in state.queue:
            self._finish(job, "cancelled", error=f"root {name} was removed from the configuration")
        state.queue.clear()
        state.wake.set()
        assert self.watcher is not None
        self.watcher.set_targets(name, {})

    async def _inspect(self, state: RootState, initial: bool = False) -> None:
        assert self._loop is not None and self.watcher is not None
        state.activity = None if initial else "scanning"
        found = await self._run(f"inspecting root {state.name}", state.name, inspect_root, state.config)
        if state.removed:
            return
        self.watcher.set_targets(state.name, found.targets)
        if not initial:
            state.rescans += 1
            old, new = state.packages, found.packages
            state.changes = {
                "added": sorted(new[k] for k in new.keys() - old.keys()),
                "removed": sorted(old[k] for k in old.keys() - new.keys()),
                "changed": sorted(new[k] for k in new.keys() & old.keys() if new[k] != old[k]),
            }
            c = state.changes
            log.info(
                "root %s: rescan %d: %d packages (%d new, %d changed, %d removed)%s",
                state.name, state.rescans, len(new), len(c["added"]), len(c["changed"]), len(c["removed"]),
                f"; {found.error}" if found.error else "",
            )
        if found.error and found.error != state.error:
            log.error("root %s: %s", state.name, found.error)
        elif state.error and not found.error:
            log.info("root %s: error cleared", state.name)
        state.exists = found.exists
        if not found.exists:
            state.drop_scans()
        state.error = found.error
        state.format = found.format
        state.db_paths = found.db_paths
        if not found.error:
            state.packages = found.packages
        elif not found.exists:
            state.packages = {}

    def _on_event(self, name: str, description: str, released: bool = False) -> None:
        """A watched directory changed (called on the loop from watchdog's thread). A
        lock file closed (`released`) may end the transaction: it is checked for at once
        (`_settled` waits a debounce more if the lock is still held)."""
        state = self.roots.get(name)
        if state is None or self.stopping:
            return
        state.events += 1
        state.last_event = description
        log.debug("root %s: %s", name, description)
        if released and state.timer is None:
            # A lock let go with nothing pending: its transaction's writes made events of
            # their own, and were settled already (or it wrote nothing).
            return
        # The last writes of an exiting package manager come right after its lock's close
        # (dpkg's triggers/Lock): they keep the short delay.
        state.released = released or (state.released and state.timer is not None)
        self._arm(state, RELEASE_DELAY if state.released else state.config.debounce)

    def _arm(self, state: RootState, delay: float) -> None:
        assert self._loop is not None
        if state.timer:
            state.timer.cancel()
        state.timer = self._loop.call_later(delay, self._settled, state)

    def _settled(self, state: RootState) -> None:
        """No event for `debounce` seconds: rescan, unless a transaction still holds its lock."""
        state.timer = None
        state.released = False
        if state.removed or self.stopping:
            return
        busy = transaction_running(state.config.path, state.db_paths) if state.exists else None
        if busy:
            if state.waiting_for is None:
                log.info("root %s: waiting for the package transaction to end (%s)", state.name, busy)
            state.waiting_for = busy
            self._arm(state, state.config.debounce)
            return
        state.waiting_for = None
        self._mark_dirty(state)

    def _mark_dirty(self, state: RootState) -> None:
        state.dirty = True
        state.wake.set()

    async def _worker(self, state: RootState) -> None:
        """One per root: rescans, prebuilds and builds of a root run one at a time."""
        while not state.removed and not self.stopping:
            await state.wake.wait()
            state.wake.clear()
            while (state.dirty or state.prebuild_wanted or state.queue) and not state.removed and not self.stopping:
                try:
                    if state.dirty:
                        state.dirty = False
                        await self._inspect(state)
                        state.activity = None
                        state.prebuild_wanted = state.config.auto_build
                    if state.prebuild_wanted and not state.dirty:
                        state.prebuild_wanted = False
                        if state.exists and not state.error:
                            await self._build(state, BuildJob(self._new_id(), state.name, "prebuild"))
                    elif state.queue and not state.dirty:
                        await self._build(state, state.queue.popleft())
                except Exception:
                    log.exception("root %s: unexpected error", state.name)
                finally:
                    state.activity = None

    # -------------------------------------------------------------- builds

    def _new_id(self) -> str:
        return f"b{next(self._ids)}"

    def submit_build(self, name: str) -> BuildJob:
        """Queue a build of root `name` (API). Raises KeyError for an unknown root."""
        state = self.roots[name]
        job = BuildJob(self._new_id(), name, "build")
        self.builds[job.id] = job
        while len(self.builds) > _MAX_BUILD_RECORDS:
            oldest = next(iter(self.builds))
            if not self.builds[oldest].done.is_set():
                break
            del self.builds[oldest]
        state.queue.append(job)
        state.wake.set()
        log.info("root %s: build %s queued", name, job.id)
        return job

    def _finish(self, job: BuildJob, outcome: str, error: str | None = None,
                result: dict[str, Any] | None = None) -> None:
        job.state = outcome
        job.error = error
        job.result = result
        job.finished = time.time()
        job.done.set()

    async def _build(self, state: RootState, job: BuildJob) -> None:
        from ..build import build
        from ..layout import ImageOptions
        from ..outputs import ImageContent, Outputs, parse_outputs, write_outputs
        from ..prior import resolve_prior

        assert self._loop is not None and self.cache is not None
        cfg = state.config
        cache = self.cache
        if job.kind == "build":
            if not state.exists:
                self._finish(job, "failed", error=f"root {cfg.name}: directory {cfg.path} does not exist")
                return
            if not cfg.output and not cfg.layers:
                self._finish(job, "failed", error=f"root {cfg.name} has no output or layers directory configured")
                return
        state.activity = "waiting"  # for a build slot
        async with self._slots:
            if self.stopping or state.removed:
                self._finish(job, "cancelled", error="the daemon is stopping")
                return
            state.activity = "prebuilding" if job.kind == "prebuild" else "building"
            job.state, job.started = "running", time.time()
            self._status(f"{state.activity} {cfg.name}")
            settings = cfg.settings
            daemon = self

            def run(work: Work):
                def progress(phase: str, done: int, total: int) -> None:
                    state.progress = {"phase": phase, "done": done, "total": total}
                    work.phase, work.progressed = phase, time.monotonic()
                    if daemon.stopping:
                        raise Cancelled("the daemon is stopping")

                with cache.session():
                    # A prebuild reads the outputs' prior plan and blobs too (without
                    # writing them), so it plans and caches the layers the real build will want.
                    prebuild = job.kind == "prebuild"
                    # An output other than oci: is published from a layout staged in the
                    # state directory, kept from build to build (and read by prebuilds).
                    outputs = parse_outputs([cfg.output], None, None, self._stage_dir(cfg.name)) \
                        if cfg.output else Outputs()
                    outputs.layers_dir = cfg.layers  # a prebuild writes nothing, so makes no directory
                    prior = resolve_prior(outputs.prior_request(state.plan, read_outputs=prebuild, cache=cache))
                    blobs = cache.blobs if prebuild else outputs.new_blobs()
                    if state.scans is None or state.scans.root != cfg.path:
                        state.drop_scans()
                        state.scans = WatchedScans(cfg.path)
                    result = build(cfg.path, settings, prior, blobs, progress=progress, scans=state.scans)
                    if prebuild:
                        return result, None
                    progress("output", 0, 1)  # the layout, then a copy by skopeo: a phase of its own
                    report = write_outputs(ImageContent.of_build(result, prior), outputs, ImageOptions(),
                                           settings.source_date_epoch)
                    return result, report

            started = time.monotonic()
            try:
                with self._no_collections:
                    result, report = await self._run(f"{job.kind} {job.id} of root {cfg.name}", cfg.name, run,
                                                     reports=True)
            except Cancelled:
                log.info("root %s: %s %s abandoned: the daemon is stopping", cfg.name, job.kind, job.id)
                self._finish(job, "cancelled", error="the daemon stopped during the build")
                return
            except (PkglayerError, OSError) as e:
                message = str(e) if isinstance(e, PkglayerError) else f"{e.strerror or e}: {e.filename or ''}"
                log.error("root %s: %s %s failed: %s", cfg.name, job.kind, job.id, message)
                self._finish(job, "failed", error=message)
                if job.kind == "prebuild":
                    state.last_prebuild = {"ok": False, "error": message, "finished": time.time()}
                if isinstance(e, TreeChangedError) and not (self.stopping or state.removed):
                    # Still being written (a copy in progress, say): a debounce later,
                    # rescanned and prebuilt again.
                    log.info("root %s: the tree changed while it was read; trying again in %g s",
                             cfg.name, cfg.debounce)
                    self._arm(state, cfg.debounce)
                return
            finally:
                state.progress = None
                state.activity = None
            elapsed = time.monotonic() - started
            # The next build keeps this plan stable and continues its observations.
            state.plan = result.history
            outcome = {
                "ok": True, **result.as_json(), **(report.as_json() if report else {}),
                "seconds": round(elapsed, 3), "finished": time.time(),
            }
            state.layers_written += result.written
            state.layers_from_cache += result.from_cache
            if job.kind == "prebuild":
                state.prebuilds += 1
                state.last_prebuild = outcome
            else:
                state.builds += 1
                outcome["id"] = job.id
                state.last_build = outcome
            await self._save_record(state)
            self._finish(job, "succeeded", result=outcome)
            log.info(
                "root %s: %s %s: %d layers, %d written, %d from the cache, %.2f s",
                cfg.name, job.kind, job.id, len(result.layers), result.written, result.from_cache, elapsed,
            )
        await self._run("evicting from the layer cache", None, cache.evict)
        await self._run("releasing freed memory", None, self._release_free_memory)
        self._status(self._status_line())


# glibc's mallopt parameter for the number of malloc arenas.
_M_ARENA_MAX = -8


def _libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(None)
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


def _limit_malloc_arenas() -> None:
    """Two malloc arenas (glibc; before any thread starts): otherwise each build thread
    gets an arena of its own, up to 8 per core, and what the builds free stays in them,
    in the daemon's resident memory."""
    libc = _libc()
    if libc is not None:
        libc.mallopt(_M_ARENA_MAX, 2)


class CollectionsPaused:
    """Held while builds run: the cyclic GC is off until the last one ends. A build
    makes tens of thousands of objects and frees them at its end; the collections they
    trigger find nothing (a tenth of a prebuild's time), and MemoryRelease collects
    after every build anyway."""

    def __init__(self) -> None:
        self._holders = 0

    def __enter__(self) -> None:
        self._holders += 1
        gc.disable()

    def __exit__(self, *exc: object) -> None:
        self._holders -= 1
        if not self._holders:
            gc.enable()


class MemoryRelease:
    """Called after every build: collect what it left in reference cycles and give what
    it freed back to the system (glibc keeps it otherwise), as the daemon holds the last
    scan of every root and the next build's peak comes on top. What survives is frozen
    (gc.freeze), so that collections walk only what was made since. Every
    `full_every`-th call unfreezes and looks at all of it again: a full collection walks
    every root's scan (20-80 ms with three large roots, on every core's worth of a
    prebuild), and finds nothing there (a replaced scan is freed by its reference count:
    it holds no cycles), so it is a safety net, not the rule."""

    def __init__(self, full_every: int = 16):
        self.full_every = full_every
        self._calls = 0

    def __call__(self) -> None:
        self._calls += 1
        if self._calls % self.full_every == 0:
            gc.unfreeze()
        gc.collect()
        gc.freeze()
        libc = _libc()
        if libc is not None:
            libc.malloc_trim(0)


def run_daemon(config_path: str) -> int:
    """`pkglayer daemon --config FILE`."""
    config = load_daemon_config(config_path)
    setup_logging(config.log_level)
    # The CLI turns the cyclic GC off for build speed; a long-running process needs it.
    gc.enable()
    _limit_malloc_arenas()
    log.info("pkglayer %s daemon starting, config %s", __version__, config.path)
    return asyncio.run(Daemon(config).run())
