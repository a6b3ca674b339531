"""`pkglayer daemon`: watch roots, prebuild their layers into a shared cache, serve a
control API on a Unix socket. One concern per module:

- config.py   the [daemon] table and [[root]] entries of the TOML file
- cache.py    the shared content-addressed layer cache (LRU-bounded, crash-safe)
- watch.py    watchdog observers on package databases, bridged into asyncio, debounced
- service.py  roots' state, prebuilds and builds, signals, sd_notify, logging
- api.py      the aiohttp control API on the Unix socket
- client.py   `pkglayer ctl`
- notify.py   the sd_notify datagram protocol
"""
