"""Run the real daemon (`python -m pkglayer daemon`) as a subprocess for tests and the
benchmark, talk to it over its Unix socket, and look into its cache."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests import rootfs_factory as factory

REPO = Path(__file__).resolve().parent.parent


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string of plain text is a TOML basic string
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(value)


def write_config(
    path: Path, daemon: dict[str, Any], roots: list[dict[str, Any]], build: dict[str, Any] | None = None
) -> None:
    lines = []
    if build:
        lines.append("[build]")
        lines += [f"{k} = {toml_value(v)}" for k, v in build.items()]
    lines.append("[daemon]")
    lines += [f"{k} = {toml_value(v)}" for k, v in daemon.items()]
    for root in roots:
        lines.append("[[root]]")
        lines += [f"{k} = {toml_value(v)}" for k, v in root.items()]
    path.write_text("\n".join(lines) + "\n")


class _Conn(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float):
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.unix_path)


def wait_until(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


class DaemonProcess:
    def __init__(self, workdir: Path, roots: list[dict[str, Any]], daemon: dict[str, Any] | None = None,
                 build: dict[str, Any] | None = None, env: dict[str, str] | None = None):
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.socket = str(workdir / "run" / "pkglayer.sock")
        self.state_dir = workdir / "state"
        self.config = workdir / "pkglayer.toml"
        self.daemon_settings = {"socket": self.socket, "state-dir": str(self.state_dir), "log-level": "debug",
                                **(daemon or {})}
        self.roots = roots
        self.build = build
        self.write_config()
        inherited = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "JOURNAL_STREAM")
        self.env = {k: v for k, v in os.environ.items() if k not in inherited}
        self.env.update(env or {})
        self.log_path = workdir / "daemon.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def write_config(self) -> None:
        write_config(self.config, self.daemon_settings, self.roots, self.build)

    @property
    def cache_dir(self) -> Path:
        return self.state_dir / "cache"

    def start(self, wait_ready: bool = True) -> DaemonProcess:
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pkglayer", "daemon", "--config", str(self.config)],
            stdout=log, stderr=log, env=self.env, cwd=REPO,
        )
        log.close()
        if wait_ready:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = 60) -> None:
        def ready() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited with {self.proc.returncode}:\n{self.log()}")
            try:
                status, body = self.api("GET", "/v1/health")
            except OSError:
                return False
            return status == 200 and body["ready"]

        wait_until(ready, timeout, "the daemon to be ready")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def api(self, method: str, path: str, body: Any = None, raw: bytes | None = None,
            timeout: float = 120) -> tuple[int, Any]:
        conn = _Conn(self.socket, timeout)
        try:
            data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
            conn.request(method, path, body=data, headers={"Content-Type": "application/json"} if data else {})
            resp = conn.getresponse()
            payload = resp.read()
            return resp.status, json.loads(payload) if payload else None
        finally:
            conn.close()

    def root(self, name: str) -> dict[str, Any]:
        status, body = self.api("GET", f"/v1/roots/{name}")
        assert status == 200, body
        return body

    def wait_root(self, name: str, predicate: Callable[[dict[str, Any]], bool], timeout: float = 120,
                  what: str = "") -> dict[str, Any]:
        last: dict[str, Any] = {}

        def check() -> dict[str, Any] | None:
            nonlocal last
            status, last = self.api("GET", f"/v1/roots/{name}")
            if status == 404:  # not configured yet: a SIGHUP reload may still be running
                return None
            assert status == 200, last
            return last if predicate(last) else None

        try:
            return wait_until(check, timeout, what or f"root {name}")
        except AssertionError as e:
            raise AssertionError(f"{e}; last state: {json.dumps(last)[:3000]}\n{self.log()[-5000:]}") from None

    def wait_settled(self, name: str, rescans: int, timeout: float = 120) -> dict[str, Any]:
        """Root `name` has been rescanned `rescans` times and is ready (prebuilt, nothing pending)."""
        return self.wait_root(
            name, lambda r: r["rescans"] >= rescans and r["state"] == "ready" and not r["pending"], timeout,
            f"root {name} to settle after rescan {rescans}",
        )

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 60) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"daemon did not stop within {timeout} s:\n{self.log()[-5000:]}") from None

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()


# ------------------------------------------------------------------ for the daemon's tests


def start(daemons: list[DaemonProcess], *args: Any, **kwargs: Any) -> DaemonProcess:
    """A started DaemonProcess(*args, **kwargs), added to the `daemons` fixture's list
    (killed at the end of the test)."""
    d = DaemonProcess(*args, **kwargs)
    daemons.append(d)
    return d.start()


def root_entry(name: str, path: Path, **extra: Any) -> dict[str, Any]:
    """A [[root]] of the daemon's configuration: zstd, one second of debounce, EXTRA."""
    return {"name": name, "path": str(path), "compression": "zstd", "debounce": 1.0, **extra}


def copy_root(src: Path, dst: Path) -> Path:
    """A private copy of a cached tree (see rootfs_factory.copy_tree) at DST."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    factory.copy_tree(src, dst)
    return dst


def cache_blobs(d: DaemonProcess) -> dict[str, Path]:
    """digest -> path of every blob in the daemon's layer cache."""
    blobs = d.cache_dir / "blobs" / "sha256"
    return {f"sha256:{p.name}": p for p in blobs.iterdir()} if blobs.is_dir() else {}


def temp_files(d: DaemonProcess) -> list[str]:
    """Names in the cache's temp directory (blob-*.tmp: a layer write in progress or cut short)."""
    tmp = d.cache_dir / ".pkglayer-tmp"
    return sorted(p.name for p in tmp.iterdir()) if tmp.is_dir() else []


def written_layers(result: dict[str, Any]) -> dict[str, list[str]]:
    """The layers a build or prebuild wrote, with their packages."""
    return {layer["name"]: layer["packages"] for layer in result["layers"] if not layer["reused"]}
