"""forked.py: a function run in a forked child beside other work; anything wrong in the
child makes `result` None, never a wrong value or a hang."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time

import pytest

from pkglayer.forked import Forked, single_threaded

log = logging.getLogger("pkglayer.test-forked")


def _report(word: str) -> dict:
    log.warning("the child says %s", word)
    return {"pid": os.getpid(), "word": word}


def test_the_value_and_the_log_records_come_back_from_the_child(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    child = Forked(_report, "hello")
    value = child.result()
    assert value == {"pid": value["pid"], "word": "hello"} and value["pid"] != os.getpid()
    records = [r for r in caplog.records if r.name == "pkglayer.test-forked"]
    assert [(r.levelno, r.getMessage()) for r in records] == [(logging.WARNING, "the child says hello")]
    child.cancel()  # after result: nothing left to stop


def _raise() -> None:
    raise ValueError("broken")


def _killed() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _unpicklable():
    return lambda: None


@pytest.mark.parametrize("fn", [_raise, _killed, _unpicklable])
def test_a_child_that_fails_gives_no_value(fn) -> None:
    child = Forked(fn)
    assert child.result() is None
    with pytest.raises(ChildProcessError):
        os.waitpid(-1, os.WNOHANG)  # reaped: no child left behind


def test_cancel_stops_a_running_child_and_reaps_it() -> None:
    child = Forked(time.sleep, 60)
    pid = child.pid
    started = time.monotonic()
    child.cancel()
    assert time.monotonic() - started < 10 and child.pid is None
    with pytest.raises(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)
    assert child.result() is None


def test_single_threaded_counts_every_thread() -> None:
    # In a fresh interpreter: this test process may run threads of other tests.
    code = (
        "import threading; from pkglayer.forked import single_threaded as s\n"
        "alone = s(); e = threading.Event(); t = threading.Thread(target=e.wait); t.start()\n"
        "busy = s(); e.set(); t.join()\n"
        "import time; deadline = time.monotonic() + 5\n"  # the thread's task may outlive join() a moment
        "while not s() and time.monotonic() < deadline: time.sleep(0.01)\n"
        "print(alone, busy, s())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["True", "False", "True"]
    assert isinstance(single_threaded(), bool)


def test_a_brief_child_is_not_tied_to_the_parents_life() -> None:
    """Tying a child to its parent (prctl through ctypes) costs a few ms of the child's
    start: a brief one, whose work ends by itself, skips it; others do not."""
    code = (
        "import sys; from pkglayer.forked import Forked\n"
        "loaded = lambda: 'ctypes' in sys.modules\n"
        "print(Forked(loaded, brief=True).result(), Forked(loaded).result())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "True"]
