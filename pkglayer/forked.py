"""A function run in a forked child while this process goes on with other work.

For work that holds the GIL, as reading a package database does: on a thread it would
take turns with the walk of the tree, in a child it runs on another core beside it.
Only from a process with a single thread: a child has only the thread that forked, and
a lock another thread held at that moment would stay held in it for ever. So the CLI
uses it and the daemon (threads: watches, workers) does not; `single_threaded` also
decides whether a build writes its layers in forked processes (build.py).

The result comes back pickled through a pipe; so do the child's log records, handled
here as if logged here. If anything goes wrong in the child (an error, a crash, a
kill), `result` says so (None) and the caller does the work itself, which raises the
error where it would have been raised without a child.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import signal
from collections.abc import Callable

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing takes ~3 ms to load: annotations only
    from typing import Any


def single_threaded() -> bool:
    """Whether this process runs one thread, native ones included."""
    try:
        return len(os.listdir("/proc/self/task")) == 1
    except OSError:
        return False


_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_parent(parent: int) -> None:
    """In a forked child: be killed when the parent dies (Linux's PR_SET_PDEATHSIG), or
    end now if it already has. A parent killed by SIGTERM or SIGKILL would otherwise
    leave its children waiting for work that never comes."""
    import ctypes  # here: only children need it

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:
        os._exit(1)


class _Collect(logging.Handler):
    """Keeps the child's records, made plain (message formatted, no arguments or
    traceback objects), so that they pickle."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        record.msg = record.getMessage()
        record.args = None
        if record.exc_info:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
            record.exc_info = None
        self.records.append(record)


class Forked:
    """`fn(*args)` started in a child process; `result()` waits for it.

    A `brief` child, whose work ends by itself in moments, is not tied to the parent's
    life (die_with_parent): loading ctypes for it took a tenth of the memo's answer."""

    def __init__(self, fn: Callable[..., Any], *args: Any, brief: bool = False):
        read_end, write_end = os.pipe()
        parent = None if brief else os.getpid()
        pid = os.fork()
        if pid == 0:
            self._child(parent, read_end, write_end, fn, args)
        os.close(write_end)
        self.pid: int | None = pid
        self._read_end = read_end

    @staticmethod
    def _child(parent: int | None, read_end: int, write_end: int, fn: Callable[..., Any],
               args: tuple[Any, ...]) -> None:
        # Never returns: os._exit runs no atexit handler and flushes no buffer of the parent's.
        code = 1
        try:
            if parent is not None:
                die_with_parent(parent)
            os.close(read_end)
            # Ctrl-C reaches the whole process group; the parent decides, and kills this child.
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            collect = _Collect()
            logging.root.handlers = [collect]
            value = fn(*args)
            data = pickle.dumps((value, collect.records), protocol=pickle.HIGHEST_PROTOCOL)
            with open(write_end, "wb") as out:
                out.write(data)
            code = 0
        finally:
            os._exit(code)

    def result(self) -> Any | None:
        """The function's value, or None if the child did not give one."""
        if self.pid is None:
            return None
        try:
            with open(self._read_end, "rb") as pipe:
                data = pipe.read()
        finally:
            _, status = os.waitpid(self.pid, 0)
            self.pid = None
        if os.waitstatus_to_exitcode(status) != 0 or not data:
            return None
        try:
            value, records = pickle.loads(data)
        except Exception:
            return None
        for record in records:
            logging.getLogger(record.name).handle(record)
        return value

    def cancel(self) -> None:
        """Stop the child, if it still runs, and reap it."""
        if self.pid is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)
        os.close(self._read_end)
        os.waitpid(self.pid, 0)
        self.pid = None
