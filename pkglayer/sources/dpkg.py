"""Reader for dpkg's database (Debian, Ubuntu and derivatives).

What dpkg records, and where:
- `var/lib/dpkg/status`: one deb822 paragraph per package (name, version, state,
  conffiles with their md5);
- `var/lib/dpkg/info/PKG[:ARCH].list`: every path the package installed, one a line;
  `.md5sums` beside it: md5 of the regular files except (usually) conffiles;
- `var/lib/dpkg/diversions`: paths moved aside so another package can install there.
"""

from __future__ import annotations

import hashlib
import logging
import re
import time
import zlib
from collections import Counter
from typing import Any

from ..errors import DatabaseError, RootfsError
from ..rootfs import Rootfs
from .base import CHANGELOG_SPAN, MAX_CHANGELOG_ENTRIES, FileRecord, Package, PackageSource, settled_times

log = logging.getLogger(__name__)

ADMINDIR = "var/lib/dpkg"
STATUS = f"{ADMINDIR}/status"
INFO = f"{ADMINDIR}/info"
DIVERSIONS = f"{ADMINDIR}/diversions"
DOC = "usr/share/doc"
# The newest entries are at the top; a few MB covers far more than the planner reads.
_MAX_CHANGELOG_GZ = 8 << 20
_MAX_CHANGELOG_TEXT = 4 << 20
_FIRST_CHANGELOG_TEXT = 16 << 10

# States whose files are not on disk (config-files: only conffiles are left, and dpkg
# no longer lists them in a .list; not-installed: a leftover selection).
_ABSENT_STATES = {"not-installed", "config-files"}
# The fields this reader uses; the rest of each paragraph is dropped early.
_FIELDS = {"Package", "Status", "Version", "Architecture", "Source", "Installed-Size", "Conffiles"}
# A line that is neither a continuation, a "Field:" line nor blank.
_BAD_LINE = re.compile(rb"^(?![ \t]|[^\s:#-][^\s:]*:|[ \t]*$)", re.M)
# A blank line (the end of the line before it, then the blank line), followed by a
# continuation line (an orphan) or by a paragraph's first line; the same at the start of
# the file. Each pattern starts with a literal newline, which the regex engine searches
# for fast: anchored at every line start (^ with re.M), they were tried at every byte.
_ORPHAN_CONTINUATION = re.compile(rb"\n[ \t]*\n(?=[ \t]+\S)")
_ORPHAN_AT_START = re.compile(rb"(?:[ \t]*\n)?(?=[ \t]+\S)")
_PARAGRAPH_START = re.compile(rb"\n[ \t]*\n(?=\S)")
_PARAGRAPH_AT_START = re.compile(rb"(?:[ \t]*\n)?(?=\S)")
_MD5 = re.compile(r"[0-9a-f]{32}")
# The line that ends each changelog entry (Debian Policy 4.4): " -- NAME <EMAIL>  DATE".
# The planner needs only the dates: finding these lines takes half the time that
# python-debian's Changelog took to parse every line of every entry (45 ms against 100
# for the 140 changelogs of the large benchmark tree). A test checks both find the same
# entries in a real tree; past an old-format section, where python-debian stops, these
# go on with older entries, which the planner's window leaves out anyway. A literal
# newline first, as above.
_TRAILER = re.compile(rb"\n -- [^\n]*>  ?([^\n]+)")


# The packages of the last read of each root (the last _MAX_ROOTS_KNOWN roots), by
# their status entry and the stamps of the files read for them (see
# DpkgSource.packages): the daemon re-reads a database after every transaction, which
# changes a few packages of hundreds. Files changed this recently may change again
# unseen (a coarse clock): their packages are not remembered.
_PACKAGES: dict[str, dict[tuple[Any, ...], Package]] = {}
_MAX_ROOTS_KNOWN = 16
_RACY_SECONDS = 2
# The checked fields of the status paragraphs of the last read of each root, by the
# sha256 of each paragraph's bytes: after a transaction, deb822 parses only the
# paragraphs dpkg wrote. (A digest: the bytes would keep a copy of the status file,
# descriptions and all, per root.)
_PARAGRAPHS: dict[str, dict[bytes, dict[str, str]]] = {}


def _recent_entry_times(packed: bytes) -> list[int]:
    """Entry times from a gzipped changelog: parse 8 entries, then 40, then up to
    MAX_CHANGELOG_ENTRIES, while the oldest parsed is within CHANGELOG_SPAN of the newest."""
    inflate = zlib.decompressobj(wbits=31)  # gzip
    text = inflate.decompress(packed, _FIRST_CHANGELOG_TEXT)
    found: list[int] = []
    for limit in (8, 40, MAX_CHANGELOG_ENTRIES):
        found = _entry_times(text, limit)
        if not found or min(found) <= max(found) - CHANGELOG_SPAN:
            break  # reached entries too old to matter
        complete = inflate.eof or len(text) >= _MAX_CHANGELOG_TEXT
        if complete and len(found) < limit:
            break  # the whole changelog was parsed
        if not complete:
            text += inflate.decompress(inflate.unconsumed_tail, _MAX_CHANGELOG_TEXT - len(text))
    return found


def _entry_times(text: bytes, max_entries: int) -> list[int]:
    """The times of the first `max_entries` entries, from their trailer lines."""
    from email.utils import parsedate_to_datetime  # here: a rebuild that finds the database unchanged never needs it

    times = []
    for n, found in enumerate(_TRAILER.finditer(b"\n" + text)):
        if n == max_entries:
            break
        try:
            times.append(int(parsedate_to_datetime(found[1].decode("latin-1").strip()).timestamp()))
        except (TypeError, ValueError, OverflowError):
            continue
    return times


def _decode(data: bytes) -> str:
    # dpkg stores bytes; names that are not UTF-8 must survive the round trip to the disk.
    return data.decode("utf-8", "surrogateescape")


class DpkgSource(PackageSource):
    format = "dpkg"

    def __init__(self, rootfs: Rootfs):
        super().__init__(rootfs)
        self._installed: list[dict[str, str]] | None = None
        # (file name, sha256 of the gzip) -> entry times: binary packages of one source
        # ship the same changelog
        self._changelogs: dict[tuple[str, bytes], list[int]] = {}

    @classmethod
    def detect(cls, rootfs: Rootfs) -> bool:
        return rootfs.is_file(STATUS)

    def database_paths(self) -> list[str]:
        return [ADMINDIR]

    def architecture(self) -> str | None:
        installed = self._status()
        for para in installed:
            if para["Package"] == "dpkg":
                return para["Architecture"]
        counts = Counter(p["Architecture"] for p in installed if p["Architecture"] != "all")
        if not counts:
            return None
        # Highest count; ties broken by name so the answer does not depend on file order.
        return min(counts, key=lambda a: (-counts[a], a))

    def packages(self) -> list[Package]:
        installed = self._status()
        diversions = self._diversions()
        info = set(self.rootfs.listdir(INFO))
        records = _records_by_base(info)
        diverted = hashlib.sha256(repr(sorted(diversions.items())).encode("utf-8", "surrogateescape")).digest()
        racy_ns = (time.time() - _RACY_SECONDS) * 1e9
        known = _PACKAGES.pop(self.rootfs.path, {})
        remembered: dict[tuple[Any, ...], Package] = {}
        pkgs = []
        for para in installed:
            # A package whose status entry and files read are what they were when it was
            # last read is that package again (the daemon reads the database after every
            # transaction, which changes a few packages of hundreds).
            names = self._info_names(para, info)
            stamps = tuple(self.rootfs.stamp(f"{INFO}/{n}") for n in names)
            docs = tuple(self.rootfs.stamp(d) for d in self._changelog_names(para["Package"], para["Architecture"]))
            own = records.get(self._base(para, info), ())
            key = (tuple(sorted(para.items())), diverted, stamps, docs, own)
            pkg = known.get(key)
            if pkg is None:
                listed = stamps[0] if names and names[0].endswith(".list") else None
                pkg = self._package(para, info, diversions, listed, own)
            if all(s is None or s[5] < racy_ns for s in (*stamps, *docs)):
                remembered[key] = pkg
            pkgs.append(pkg)
        _PACKAGES[self.rootfs.path] = remembered
        while len(_PACKAGES) > _MAX_ROOTS_KNOWN:
            del _PACKAGES[next(iter(_PACKAGES))]
        return sorted(pkgs, key=lambda p: p.key)

    @staticmethod
    def _base(para: dict[str, str], info: set[str]) -> str:
        """The name of the package's files in info/: Multi-Arch: same packages are
        stored as PKG:ARCH, the others as plain PKG."""
        name, arch = para["Package"], para["Architecture"]
        return f"{name}:{arch}" if f"{name}:{arch}.list" in info else name

    @classmethod
    def _info_names(cls, para: dict[str, str], info: set[str]) -> tuple[str, ...]:
        """The files of info/ that `_package` reads for the package."""
        base = cls._base(para, info)
        return tuple(f"{base}.{x}" for x in ("list", "md5sums") if f"{base}.{x}" in info)

    # -- status ------------------------------------------------------------------------

    def _status(self) -> list[dict[str, str]]:
        """Paragraphs of packages whose files are on disk, checked for the fields we need."""
        if self._installed is None:
            self._installed = self._parse_status()
        return self._installed

    def _parse_status(self) -> list[dict[str, str]]:
        try:
            data = self.rootfs.read_bytes(STATUS)
        except (OSError, RootfsError) as e:
            raise DatabaseError(f"{STATUS}: cannot read: {e}") from None
        if b"\0" in data:
            raise DatabaseError(f"{STATUS}: binary data, not a dpkg status file")
        starts = _paragraph_starts(data)
        known = _PARAGRAPHS.pop(self.rootfs.path, {})
        remembered: dict[bytes, dict[str, str]] = {}
        installed = []
        for start, end in zip(starts, [*starts[1:], len(data)]):
            # A paragraph runs to the next one's first line (blank lines included): the
            # same bytes are the same fields, checked when they were first parsed.
            chunk = data[start:end]
            digest = hashlib.sha256(chunk).digest()
            fields = known.get(digest) or remembered.get(digest)
            if fields is None:
                fields = _parse_paragraph(chunk, data, start)
            remembered[digest] = fields
            if fields["Status"].split()[2] not in _ABSENT_STATES:
                installed.append(fields)
        _PARAGRAPHS[self.rootfs.path] = remembered
        while len(_PARAGRAPHS) > _MAX_ROOTS_KNOWN:
            del _PARAGRAPHS[next(iter(_PARAGRAPHS))]
        return installed

    # -- per package -------------------------------------------------------------------

    def _package(
        self, para: dict[str, str], info: set[str], diversions: dict[str, tuple[str, str]],
        list_stamp: tuple[int, ...] | None,
        records: tuple[str, ...] = (),
    ) -> Package:
        """The package of a status paragraph. `list_stamp`, the Rootfs.stamp of its
        .list, vouches for its files (Package.files_settled_ns): dpkg writes the list
        after renaming the unpacked files into place (conffiles come later, at configure
        time: the ownership rules never take them on trust)."""
        name, arch = para["Package"], para["Architecture"]
        settled_ns, copied = settled_times(list_stamp)
        epoch, sep, version = para["Version"].partition(":")
        if not sep:
            epoch, version = "", epoch
        source = para.get("Source", "").split(" ", 1)[0] or name
        size = para.get("Installed-Size", "").strip()

        base = self._base(para, info)
        if f"{base}.list" not in info:
            raise DatabaseError(f"{INFO}/{name}.list: missing for installed package {name}:{arch}")
        listed = self._read_info(f"{base}.list")
        md5s = self._md5sums(f"{base}.md5sums") if f"{base}.md5sums" in info else {}
        conffiles = _conffiles(para.get("Conffiles", ""))

        files = []
        for path in listed.split("\n"):
            if not path or path == "/.":
                continue
            # Digests are recorded under the listed path, even when it is diverted.
            config = path in conffiles
            conf_digest, obsolete = conffiles.get(path, (None, False))
            digest = conf_digest or md5s.get(path.lstrip("/"))
            diverted = diversions.get(path)
            if diverted is not None and diverted[1] != name:
                path = diverted[0]  # another package (or the admin) took the listed path
            if obsolete:
                # The package no longer ships it: what is on disk is an old version (or
                # the admin's edit) that dpkg keeps until purge. The path stays the
                # package's, but its content is not this package's: flag it as a ghost.
                files.append(FileRecord(path=path, config=True, ghost=True))
                continue
            files.append(
                FileRecord(
                    path=path,
                    digest=digest,
                    digest_algo="md5" if digest else None,
                    config=config,
                )
            )
        return Package(
            name=name,
            version=version,
            arch=arch,
            epoch=epoch or None,
            release=None,
            source=source,
            size=int(size) * 1024 if size.isdigit() else 0,
            files_settled_ns=settled_ns,
            files_copied=copied,
            changelog=self._changelog_times(name, arch),
            files=tuple(files),
            records=records,
        )

    def _changelog_times(self, name: str, arch: str) -> tuple[int, ...]:
        """Entry times of usr/share/doc/NAME/changelog.Debian.gz (plus binNMU entries).

        Advisory input to the planner: a missing, damaged or oversized changelog yields
        what could be read, never an error. Policy lets the doc directory be a symlink to
        another package of the same source; Rootfs keeps that inside the tree.
        Changelogs run newest first and only the last CHANGELOG_SPAN counts, so the top
        few entries are parsed first, and the rest only while they are still recent: a
        full parse of every changelog was a third of a warm rebuild."""
        times: set[int] = set()
        for doc in self._changelog_names(name, arch):
            try:
                packed = self.rootfs.read_bytes(doc, max_size=_MAX_CHANGELOG_GZ)
                key = (doc.rsplit("/", 1)[1], hashlib.sha256(packed).digest())
                found = self._changelogs.get(key)
                if found is None:
                    found = self._changelogs[key] = _recent_entry_times(packed)
            except FileNotFoundError:
                continue
            except (OSError, zlib.error, RootfsError) as e:
                log.debug("%s: unreadable changelog: %s", doc, e)
                continue
            times.update(found)
        return tuple(sorted(times, reverse=True)[:MAX_CHANGELOG_ENTRIES])

    def _changelog_names(self, name: str, arch: str) -> list[str]:
        # Native packages (apt, dpkg, adduser...) keep their Debian changelog as changelog.gz.
        names = ("changelog.Debian.gz", f"changelog.Debian.{arch}.gz")
        if not self.rootfs.exists(f"{DOC}/{name}/{names[0]}"):
            names = ("changelog.gz",)
        return [f"{DOC}/{name}/{n}" for n in names]

    def _read_info(self, name: str) -> str:
        try:
            return _decode(self.rootfs.read_bytes(f"{INFO}/{name}"))
        except (OSError, RootfsError) as e:
            raise DatabaseError(f"{INFO}/{name}: cannot read: {e}") from None

    def _md5sums(self, name: str) -> dict[str, str]:
        """Relative path → md5. Lines that are not `md5  path` are ignored: the digests
        are advisory, and a damaged md5sums file should not stop a build."""
        out = {}
        for line in self._read_info(name).split("\n"):
            if len(line) > 34 and _MD5.fullmatch(line[:32]) and line[32:34] == "  ":
                out[line[34:].lstrip("/")] = line[:32]
        return out

    def _diversions(self) -> dict[str, tuple[str, str]]:
        """Original path → (diverted-to path, diverting package; ":" for a local diversion)."""
        try:
            data = self.rootfs.read_bytes(DIVERSIONS)
        except FileNotFoundError:
            return {}
        except (OSError, RootfsError) as e:
            raise DatabaseError(f"{DIVERSIONS}: cannot read: {e}") from None
        lines = _decode(data).split("\n")
        if lines and lines[-1] == "":
            lines.pop()
        if len(lines) % 3:
            raise DatabaseError(f"{DIVERSIONS}: {len(lines)} lines, not a multiple of 3")
        out = {}
        for i in range(0, len(lines), 3):
            orig, to, pkg = lines[i : i + 3]
            if not orig.startswith("/") or not to.startswith("/") or not pkg:
                raise DatabaseError(f"{DIVERSIONS}: line {i + 1}: malformed diversion entry")
            out[orig] = (to, pkg)
        return out


# dpkg keeps a package's control files in info/ as BASE.MEMBER, and member names have no dot.
_MEMBER_NAME = re.compile(r"[A-Za-z0-9_-]+")


def _records_by_base(info: set[str]) -> dict[str, tuple[str, ...]]:
    """info/'s files by the package they belong to (its base name, see `_base`):
    BASE.list, BASE.md5sums, the maintainer scripts... Shared files (format, triggers/)
    match no installed package and stay the database's."""
    found: dict[str, list[str]] = {}
    for name in info:
        base, dot, member = name.rpartition(".")
        if dot and base and _MEMBER_NAME.fullmatch(member):
            found.setdefault(base, []).append(f"{INFO}/{name}")
    return {base: tuple(sorted(names)) for base, names in found.items()}


def _paragraph_starts(data: bytes) -> list[int]:
    """Offset of each paragraph's first line, after checking every line is a field, a
    continuation or blank. deb822 silently skips lines it does not understand, which
    would turn a garbage file into an empty (valid) database."""
    bad = _BAD_LINE.search(data)
    if bad:
        raise DatabaseError(f"{STATUS}: line {_line(data, bad.start())}: not a dpkg status file")
    orphan = _ORPHAN_AT_START.match(data) or _ORPHAN_CONTINUATION.search(data)
    if orphan:
        where = f"{STATUS}: line {_line(data, orphan.end())}"
        raise DatabaseError(f"{where}: continuation line outside a field")
    first = _PARAGRAPH_AT_START.match(data)
    return ([first.end()] if first else []) + [m.end() for m in _PARAGRAPH_START.finditer(data)]


def _parse_paragraph(chunk: bytes, data: bytes, start: int) -> dict[str, str]:
    """The checked fields of one status paragraph: `chunk`, from its first line to the
    next paragraph's, found at offset `start` of the status file `data`."""
    from debian.deb822 import Packages

    # deb822 decodes strictly; latin-1 never fails and is undone field by field below,
    # so names that are not UTF-8 keep their bytes (as surrogates).
    # (No `fields=` filter: deb822 drops a paragraph that comes out empty.)
    paras = list(
        Packages.iter_paragraphs(chunk.splitlines(keepends=True), use_apt_pkg=False, encoding="latin-1")
    )
    if len(paras) != 1:
        raise DatabaseError(f"{STATUS}: line {_line(data, start)}: not a dpkg status file (unparsable paragraphs)")
    fields = {k: _decode(v.encode("latin-1")) for k, v in paras[0].items() if k in _FIELDS}
    problem = _check_paragraph(fields)
    if problem:
        raise DatabaseError(f"{STATUS}: line {_line(data, start)}: {problem}")
    return fields


def _check_paragraph(fields: dict[str, str]) -> str | None:
    """What is wrong with a status paragraph, if anything."""
    if "Package" not in fields:
        return "paragraph without a Package field"
    words = fields.get("Status", "").split()
    if len(words) != 3:
        return f"package {fields['Package']} has no valid Status field"
    if words[2] in _ABSENT_STATES:
        return None  # such entries may legitimately lack Version and Architecture
    for name in ("Version", "Architecture"):
        if not fields.get(name):
            return f"package {fields['Package']} has no {name} field"
    return None


def _line(data: bytes, offset: int) -> int:
    return data.count(b"\n", 0, offset) + 1


def _conffiles(field: str) -> dict[str, tuple[str | None, bool]]:
    """Path → (md5 or None, obsolete) from a status Conffiles field.

    Lines are ` /path md5 [obsolete] [remove-on-upgrade]`; the path may hold spaces, so
    split from the right. The md5 is "newconffile" while a package is half-installed.
    """
    out: dict[str, tuple[str | None, bool]] = {}
    for line in field.split("\n"):
        words = line.strip().split(" ")
        flags = set()
        while len(words) > 2 and words[-1] in ("obsolete", "remove-on-upgrade"):
            flags.add(words.pop())
        if len(words) < 2:
            continue
        path, md5 = " ".join(words[:-1]), words[-1]
        out[path] = (md5 if _MD5.fullmatch(md5) else None, "obsolete" in flags)
    return out
