"""The control API: HTTP/1.1 with JSON bodies on a Unix socket (aiohttp). Never TCP.

    GET  /v1/health                   liveness and readiness
    GET  /v1/roots                    every root's summary
    GET  /v1/roots/{name}             one root in detail (packages, last prebuild, changes)
    POST /v1/roots/{name}/build       queue a build; body {"wait": true, "timeout": S} or ?wait=1
    GET  /v1/builds                   recent builds
    GET  /v1/builds/{id}[?wait=S]     one build; with wait, block until it ends (at most S s)
    GET  /v1/cache                    layer cache figures

Errors are JSON too: {"error": {"status": 404, "message": "..."}}: 400 malformed
request, 404 unknown root/build/path, 405 wrong method, 409 the root cannot be built
now (missing, no output), 503 the daemon is stopping. Any client can send anything: a
malformed request is answered with 400 and logged as one warning line; only a fault of
the daemon's own is logged as an error (with its traceback, in one journal entry).

The socket file is bound under a temporary name, given its owner (root and the optional
group) and mode (0660 with a group, else 0600) before listen(), and only then renamed
to its final name: nobody can connect through looser permissions, even briefly.
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import json
import logging
import math
import os
import socket
import stat
import sys
import time
from typing import TYPE_CHECKING, Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from .. import __version__
from ..errors import PkglayerError

if TYPE_CHECKING:
    from .service import Daemon

log = logging.getLogger(__name__)

_MAX_BODY = 64 * 1024
_MAX_WAIT = 24 * 3600


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": {"status": status, "message": message}}, status=status)


def _line(text: object, limit: int = 200) -> str:
    return " ".join(str(text).split())[:limit]


@web.middleware
async def _json_errors(request: web.Request, handler):
    try:
        return await handler(request)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        message = e.text if e.text and not e.text.startswith(f"{e.status}:") else e.reason
        if e.status == 404 and message == "Not Found":
            message = f"no such endpoint: {request.method} {request.path}"
        if e.status == 405:
            message = f"method {request.method} is not allowed on {request.path}"
        if e.status == 400:
            log.warning("bad request %s %s: %s", request.method, _line(request.path, 100), _line(message))
        return _error(e.status, message)
    except (asyncio.CancelledError, ConnectionError):
        raise
    except Exception:
        log.exception("request %s %s failed", request.method, _line(request.path, 100))
        return _error(500, "internal error (see the daemon's log)")


class _ProtocolLog(logging.LoggerAdapter):
    """aiohttp's server logger, for requests that never reach a handler (not HTTP, bad
    headers, a body too large): one warning line each, not a traceback per client."""

    def log(self, level, msg, *args, exc_info=None, **kwargs):  # type: ignore[override]
        exc = exc_info if isinstance(exc_info, BaseException) else sys.exc_info()[1] if exc_info else None
        if isinstance(exc, HttpProcessingError):
            self.logger.warning("malformed request: %s", _line(exc.message or exc))
        else:
            self.logger.log(level, msg, *args, exc_info=exc_info, **kwargs)


def bind_unix_socket(path: str, group: str | None) -> socket.socket:
    """A listening AF_UNIX stream socket at `path`, owned by root (the daemon's uid) and
    `group`, mode 0660 (0600 without a group). A stale socket file is replaced; a live
    one (another daemon) or any other file at `path` is an error."""
    directory = os.path.dirname(path)
    os.makedirs(directory, mode=0o755, exist_ok=True)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(st.st_mode):
            raise PkglayerError(f"{path} exists and is not a socket; not touching it")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except (ConnectionRefusedError, FileNotFoundError):
            pass  # stale: its daemon is gone
        else:
            raise PkglayerError(f"another process is already listening on {path}")
        finally:
            probe.close()
    gid = grp.getgrnam(group).gr_gid if group else -1
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.bind(tmp)
        os.chown(tmp, os.geteuid(), gid)
        os.chmod(tmp, 0o660 if group else 0o600)
        sock.listen(128)
        os.rename(tmp, path)
    except BaseException:
        sock.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    sock.setblocking(False)
    return sock


class ApiServer:
    def __init__(self, daemon: Daemon):
        self.daemon = daemon
        self.app = web.Application(middlewares=[_json_errors], client_max_size=_MAX_BODY)
        self.app.add_routes(
            [
                web.get("/v1/health", self.health),
                web.get("/v1/roots", self.list_roots),
                web.get("/v1/roots/{name}", self.get_root),
                web.post("/v1/roots/{name}/build", self.build),
                web.get("/v1/builds", self.list_builds),
                web.get("/v1/builds/{id}", self.get_build),
                web.get("/v1/cache", self.cache),
            ]
        )
        self.runner: web.AppRunner | None = None
        self.path: str | None = None
        self._ident: tuple[int, int] | None = None

    async def start(self, path: str, group: str | None) -> None:
        sock = bind_unix_socket(path, group)
        st = os.stat(path)
        self.path, self._ident = path, (st.st_dev, st.st_ino)
        # shutdown_timeout: requests still open when the daemon stops get 2 s (their
        # builds have been settled by then, see Daemon._shutdown).
        self.runner = web.AppRunner(self.app, access_log=None, handle_signals=False, shutdown_timeout=2.0,
                                    logger=_ProtocolLog(log, {}))
        await self.runner.setup()
        await web.SockSite(self.runner, sock).start()

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
        if self.path:
            with contextlib.suppress(OSError):
                st = os.stat(self.path)
                if (st.st_dev, st.st_ino) == self._ident:  # still ours: not a newer daemon's
                    os.unlink(self.path)

    # ------------------------------------------------------------ handlers

    def _root(self, request: web.Request):
        name = request.match_info["name"]
        state = self.daemon.roots.get(name)
        if state is None:
            known = ", ".join(sorted(self.daemon.roots)) or "none"
            raise web.HTTPNotFound(text=f"unknown root {name!r} (known roots: {known})")
        return state

    async def health(self, request: web.Request) -> web.Response:
        """status: "ok"; "starting"; "stuck" (some work has not progressed for
        daemon.stall-timeout seconds: `stuck` lists it); "stopping"."""
        d = self.daemon
        errors = sorted(s.name for s in d.roots.values() if s.state == "error")
        now = time.monotonic()
        stuck = d.stuck()
        status = "stopping" if d.stopping else "stuck" if stuck else "starting" if not d.ready else "ok"
        return web.json_response(
            {
                "status": status,
                "version": __version__,
                "pid": os.getpid(),
                "uptime": round(time.time() - d.started, 3),
                "roots": len(d.roots),
                "rootsWithErrors": errors,
                "ready": d.ready,
                "work": [w.to_json(now) for w in d.work.values()],
                "stuck": [w.to_json(now) for w in stuck],
                "stallTimeout": d.config.stall_timeout,
                "memory": await d.memory(),
            }
        )

    async def list_roots(self, request: web.Request) -> web.Response:
        return web.json_response({"roots": [s.summary() for s in self.daemon.roots.values()]})

    async def get_root(self, request: web.Request) -> web.Response:
        return web.json_response(self._root(request).detail())

    async def build(self, request: web.Request) -> web.Response:
        state = self._root(request)
        if self.daemon.stopping:
            return _error(503, "the daemon is stopping")
        body: Any = {}
        if request.can_read_body:
            raw = await request.read()
            if raw.strip():
                try:
                    body = json.loads(raw)
                except (ValueError, UnicodeDecodeError, RecursionError) as e:
                    raise web.HTTPBadRequest(text=f"request body is not valid JSON: {_line(e)}") from None
        if not isinstance(body, dict):
            raise web.HTTPBadRequest(text="request body must be a JSON object")
        unknown = sorted(set(body) - {"wait", "timeout"})
        if unknown:
            raise web.HTTPBadRequest(text=f"unknown field {_line(unknown[0], 80)!r} in request body "
                                     "(known: wait, timeout)")
        wait = body.get("wait", _flag(request.query.get("wait")))
        if not isinstance(wait, bool):
            raise web.HTTPBadRequest(text="'wait' must be true or false")
        timeout = body.get("timeout", request.query.get("timeout", _MAX_WAIT))
        timeout = _seconds(timeout)
        if timeout is None:
            raise web.HTTPBadRequest(text="'timeout' must be a positive number of seconds")
        cfg = state.config
        if not cfg.output and not cfg.layers:
            return _error(409, f"root {cfg.name} has no output or layers directory configured")
        if not state.exists:
            return _error(409, f"root {cfg.name}: directory {cfg.path} does not exist")
        job = self.daemon.submit_build(cfg.name)
        if wait:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(job.done.wait(), timeout)
            return web.json_response({"build": job.to_json()}, status=200 if job.done.is_set() else 202)
        return web.json_response({"build": job.to_json()}, status=202)

    async def list_builds(self, request: web.Request) -> web.Response:
        return web.json_response({"builds": [j.to_json() for j in self.daemon.builds.values()]})

    async def get_build(self, request: web.Request) -> web.Response:
        job = self.daemon.builds.get(request.match_info["id"])
        if job is None:
            raise web.HTTPNotFound(text=f"unknown build {request.match_info['id']!r}")
        if "wait" in request.query:
            timeout = _seconds(request.query["wait"] or _MAX_WAIT)
            if timeout is None:
                raise web.HTTPBadRequest(text="'wait' must be a positive number of seconds")
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(job.done.wait(), timeout)
        return web.json_response({"build": job.to_json()})

    async def cache(self, request: web.Request) -> web.Response:
        cache = self.daemon.cache
        assert cache is not None
        stats = await asyncio.get_running_loop().run_in_executor(None, cache.stats)
        return web.json_response(
            {
                "path": cache.root,
                "entries": stats.entries,
                "bytes": stats.bytes,
                "maxBytes": stats.max_bytes,
                "hits": stats.hits,
                "misses": stats.misses,
                "added": stats.added,
                "evicted": stats.evicted,
                "startupCheck": cache.last_check,
            }
        )


def _flag(value: str | None) -> bool:
    return value is not None and value.lower() in ("", "1", "true", "yes")


def _seconds(value: object) -> float | None:
    if isinstance(value, bool):
        return None
    try:
        seconds = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    if math.isnan(seconds) or not 0 < seconds <= _MAX_WAIT:
        return None
    return seconds
