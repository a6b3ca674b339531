"""The ownership rules (pkglayer.ownership.RULES) one by one, on small trees made here.

What a package database says is given as its records (`Listed` below, a PackageSource
whose packages are data): that states the modes, mtimes, link targets, %ghost flags and
digests the rules compare without building a package per case; the readers of real
databases are tested in test_sources*.py, and whole real roots in test_ownership.py and
the end-to-end tests. The trees, the walk and pip's dist-info directories are real.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import re
import socket
import stat
from pathlib import Path

import pytest

from pkglayer.digests import CONTENT_HASH, new_hasher
from pkglayer.errors import ConfigError
from pkglayer.ownership import MAX_BIG_FILES, Ownership, scan_ownership
from pkglayer.rootfs import Rootfs
from pkglayer.sources import FileRecord, Package, PackageSource
from pkglayer.usercomponents import ComponentSpec, big_file_name
from tests.helpers import tmpfs

DB = "var/lib/listed"


class Listed(PackageSource):
    """A package database given as its records."""

    format = "listed"

    def __init__(self, rootfs: Rootfs, packages: list[Package]):
        super().__init__(rootfs)
        self._packages = packages

    @classmethod
    def detect(cls, rootfs: Rootfs) -> bool:
        return False

    def packages(self) -> list[Package]:
        return sorted(self._packages, key=lambda p: p.key)

    def database_paths(self) -> list[str]:
        return [DB]

    def architecture(self) -> str | None:
        return "amd64"


def own(root: Path, *packages: Package, excludes: tuple[str, ...] = (), **kwargs) -> Ownership:
    with Rootfs(root) as rootfs:
        return scan_ownership(rootfs, Listed(rootfs, list(packages)), excludes, (), **kwargs)


def write(root: Path, path: str, data: bytes = b"x") -> Path:
    p = root / path
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data)
    return p


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def pkg(name: str, *files: FileRecord, arch: str = "amd64", source: str | None = None) -> Package:
    return Package(name=name, version="1.0", arch=arch, source=source, files=files)


def homes(o: Ownership) -> dict[str, str]:
    return {path: obj.home for path, obj in o.objects.items()}


# ------------------------------------------------------------------ the database's own files and listed files


def test_listed_files_go_to_their_package_and_changed_ones_to_modified(tmp_path: Path) -> None:
    root = tmp_path / "root"
    write(root, f"{DB}/status", b"db")
    write(root, "var/lib/listed-not-db", b"a sibling that only shares a prefix")
    write(root, "usr/bin/tool", b"tool")
    write(root, "etc/tool.conf", b"edited")
    write(root, "usr/share/doc/tool/README", b"readme")
    os.chmod(root / "usr/share/doc/tool/README", 0o600)
    write(root, "usr/share/tool/dated", b"dated")
    os.utime(root / "usr/share/tool/dated", (1_600_000_000, 1_600_000_000))
    write(root, "usr/share/tool/retyped", b"was a symlink")
    (root / "usr/lib").mkdir(parents=True)
    (root / "usr/lib/libtool.so").symlink_to("libtool.so.1")
    (root / "usr/lib/libtool.so.old").symlink_to("elsewhere")
    (root / "usr/lib/libunknown.so").symlink_to("anything")
    os.chmod(root / "usr/share/doc", 0o700)  # directory attributes are never a difference
    write(root, "etc/hostname", b"unowned")
    write(root, "var/log/ghost.log", b"the system's")
    write(root, "srv/excluded/other")
    reg = stat.S_IFREG | 0o644
    tool = pkg(
        "tool",
        FileRecord("/usr/bin/tool", digest=md5(b"tool").upper(), digest_algo="md5", mode=reg),
        FileRecord("/etc/tool.conf", digest=md5(b"as shipped"), digest_algo="md5", config=True),
        FileRecord("/usr/share/doc", mode=stat.S_IFDIR | 0o755),
        FileRecord("/usr/share/doc/tool/README", digest=md5(b"readme"), digest_algo="md5", mode=reg),
        FileRecord("/usr/share/tool/dated", mtime=1_500_000_000),
        FileRecord("/usr/share/tool/retyped", mode=stat.S_IFLNK | 0o777),
        FileRecord("/usr/lib/libtool.so", linkto="libtool.so.1", mode=stat.S_IFLNK | 0o777),
        FileRecord("/usr/lib/libtool.so.old", linkto="libtool.so.1", mode=stat.S_IFLNK | 0o755),
        FileRecord("/usr/lib/libunknown.so", mode=stat.S_IFLNK),
        FileRecord("/var/log/ghost.log", ghost=True),
        FileRecord("/usr/share/tool/gone", digest=md5(b"gone"), digest_algo="md5"),
        FileRecord("/var/log/ghost-gone.log", ghost=True),
        FileRecord("/srv/excluded/file"),
        FileRecord("/srv/excluded-not/file"),
    )
    o = own(root, tool, excludes=("srv/excluded",))
    key = tool.key
    h = homes(o)
    assert h[DB] == h[f"{DB}/status"] == "pkgdb"
    assert h["var/lib/listed-not-db"] == "unowned"
    assert h["usr/bin/tool"] == h["usr/lib/libtool.so"] == h["usr/lib/libunknown.so"] == key
    assert h["usr/share/doc"] == key  # its mode differs, but directories are normalised
    changed = ["etc/tool.conf", "usr/lib/libtool.so.old", "usr/share/doc/tool/README",
               "usr/share/tool/dated", "usr/share/tool/retyped"]
    assert o.modified == changed and all(h[p] == "modified" for p in changed)
    assert [(obj.path, rec.path) for obj, rec in o.modified_by_package[key]] == sorted(
        (p, "/" + p) for p in changed)
    assert h["etc/hostname"] == h["var/log/ghost.log"] == "unowned"
    assert o.unowned == [p for p, home in h.items() if home == "unowned"]
    # listed but absent: reported, unless a %ghost or excluded
    assert o.missing == {key: ["srv/excluded-not/file", "usr/share/tool/gone"]}
    assert o.excluded == ["srv/excluded"] and "srv/excluded/other" not in h
    assert o.source_format == "listed" and o.architecture == "amd64"
    assert o.origin(key) == "listed"
    assert o.home_bytes(key) == len(b"tool")  # regular files only: links add nothing
    assert o.home_bytes("modified") == sum((root / p).lstat().st_size for p in changed
                                           if (root / p).is_file() and not (root / p).is_symlink())

    # without comparing mtimes (--no-compare-mtimes) a different mtime alone is no change
    again = own(root, tool, excludes=("srv/excluded",), compare_mtimes=False)
    assert homes(again)["usr/share/tool/dated"] == key
    assert "usr/share/tool/dated" not in again.modified


def test_the_digest_algorithm_each_record_names_is_taken(tmp_path: Path) -> None:
    root = tmp_path / "root"
    write(root, "a", b"alpha")
    write(root, "b", b"beta")
    p = pkg("p",
            FileRecord("/a", digest=hashlib.sha256(b"alpha").hexdigest(), digest_algo="sha256"),
            FileRecord("/b", digest=hashlib.sha256(b"BETA").hexdigest(), digest_algo="sha256"))
    for hash_content in (False, True):
        o = own(root, p, hash_content=hash_content)
        assert (homes(o)["a"], homes(o)["b"]) == (p.key, "modified")
        assert (o.objects["a"].content_hash is not None) == hash_content


def test_paths_resolve_through_the_trees_own_links_and_the_first_lister_wins(tmp_path: Path) -> None:
    root = tmp_path / "root"
    write(root, "usr/lib/x/libfoo.so.1", b"foo")
    (root / "lib").symlink_to("usr/lib")  # merged /usr
    write(root, "usr/share/common", b"common")
    # "/" (listed first, as dpkg does) is no path of the tree; a package listing one file
    # by two names (merged /usr) does not share it with itself
    a = pkg("a", FileRecord("/"), FileRecord("/lib/x/libfoo.so.1"), FileRecord("/usr/share/common"),
            FileRecord("/usr/share"), FileRecord("/usr/lib"), FileRecord("/usr/lib/x/libfoo.so.1"), arch="i386")
    b_amd64 = pkg("b", FileRecord("/usr/share/common"), FileRecord("/usr/share", mode=stat.S_IFDIR | 0o755),
                  FileRecord("/usr/lib"))
    b_i386 = pkg("b", FileRecord("/usr/share/common"), arch="i386")
    o = own(root, b_i386, b_amd64, a)
    h = homes(o)
    assert h["usr/lib/x/libfoo.so.1"] == a.key and h["lib"] == "unowned"
    # by (name, arch): a before b, and b's amd64 before its i386
    assert h["usr/share/common"] == a.key
    # what several list is reported, but for what the later lister records as a directory
    assert o.shared == {"usr/lib": [a.key, b_amd64.key], "usr/share/common": [a.key, b_amd64.key, b_i386.key]}


# ------------------------------------------------------------------ pip's records


def dist_info(root: Path, site: str, name: str, version: str, files: dict[str, bytes],
              installer: str = "pip") -> None:
    """What pip writes for a distribution: its files, and a dist-info with METADATA,
    INSTALLER and RECORD (path, sha256 in urlsafe base64, size)."""
    info = f"{site}/{name}-{version}.dist-info"
    rows = []
    for path, data in files.items():
        write(root, f"{site}/{path}", data)
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        rows.append(f"{path},sha256={digest},{len(data)}")
    write(root, f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode())
    write(root, f"{info}/INSTALLER", f"{installer}\n".encode())
    rows += [f"{name}-{version}.dist-info/{f},," for f in ("METADATA", "INSTALLER", "RECORD")]
    write(root, f"{info}/RECORD", ("\n".join(rows) + "\n").encode())


SITE = "usr/local/lib/python3.11/dist-packages"


def test_pip_records_claim_what_the_distro_leaves(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = tmp_path / "root"
    dist_info(root, SITE, "alpha", "1.0", {"alpha/__init__.py": b"A = 1\n", "alpha/data.txt": b"data",
                                             "shared.py": b"both list it\n"})
    dist_info(root, SITE, "beta", "2.0", {"beta.py": b"B = 2\n", "shared.py": b"both list it\n"})
    # a distribution the distro installed (its dist-info is the distro package's)
    dist_info(root, SITE, "gamma", "3.0", {"gamma.py": b"G = 3\n"})
    dist_info(root, SITE, "zeta", "4.0", {"zeta.py": b"Z = 4\n"})  # after the dropped one
    write(root, f"{SITE}/alpha/data.txt", b"edited")
    distro = pkg("python3-gamma", FileRecord(f"/{SITE}/gamma-3.0.dist-info/METADATA"),
                 FileRecord(f"/{SITE}/beta.py"))
    with caplog.at_level(logging.INFO, logger="pkglayer.ownership"):
        o = own(root, distro)
    h = homes(o)
    keys = {p.name: k for k, p in o.packages.items()}
    assert set(keys) == {"python3-gamma", "pip-alpha", "pip-beta", "pip-zeta"}
    assert h[f"{SITE}/zeta.py"] == keys["pip-zeta"]
    assert h[f"{SITE}/alpha/__init__.py"] == h[f"{SITE}/alpha"] == keys["pip-alpha"]
    assert h[f"{SITE}/alpha/data.txt"] == "modified"
    assert o.modified_by_package[keys["pip-alpha"]][0][0].path == f"{SITE}/alpha/data.txt"
    assert h[f"{SITE}/beta.py"] == keys["python3-gamma"]  # the distro wins
    assert h[f"{SITE}/shared.py"] == keys["pip-alpha"]  # the first pip lister
    assert o.shared == {f"{SITE}/beta.py": [keys["python3-gamma"], keys["pip-beta"]],
                        f"{SITE}/shared.py": [keys["pip-alpha"], keys["pip-beta"]]}
    assert h[f"{SITE}/gamma.py"] == "unowned"  # gamma is the distro's: dropped whole
    assert o.dropped == [("pip-gamma-3.0", f"/{SITE}/gamma-3.0.dist-info/METADATA is {distro.key}'s")]
    assert [r.getMessage() for r in caplog.records if r.name == "pkglayer.ownership"] == [
        f"pip package pip-gamma-3.0 left to the distro: /{SITE}/gamma-3.0.dist-info/METADATA is {distro.key}'s"]
    assert o.origin(keys["pip-alpha"]) == "pip" and o.origin(keys["python3-gamma"]) == "listed"


# ------------------------------------------------------------------ bytecode


def test_bytecode_goes_with_the_package_of_its_source(tmp_path: Path) -> None:
    root = tmp_path / "root"
    mod = "usr/lib/python3/dist-packages/mod"
    write(root, f"{mod}/__init__.py", b"")
    write(root, f"{mod}/helper.py", b"")
    write(root, f"{mod}/__pycache__/__init__.cpython-311.pyc")
    write(root, f"{mod}/__pycache__/helper.cpython-311.opt-1.pyc")
    write(root, f"{mod}/__pycache__/helper.cpython-311.opt-2.pyc")
    write(root, f"{mod}/__pycache__/helper.pypy-73.pyc")
    write(root, f"{mod}/__pycache__/helper.cpython-311.pyc.tmp")  # not bytecode
    # source edited (modified): its bytecode stays unowned, and so does the directory
    write(root, "opt/edited/e.py", b"edited")
    write(root, "opt/edited/__pycache__/e.cpython-311.pyc")
    # a directory holding the bytecode of two packages goes to neither
    write(root, "opt/two/a.py")
    write(root, "opt/two/b.py")
    write(root, "opt/two/__pycache__/a.cpython-311.pyc")
    write(root, "opt/two/__pycache__/b.cpython-311.pyc")
    # bytecode of a file nobody owns stays unowned
    write(root, "srv/local.py")
    write(root, "srv/__pycache__/local.cpython-311.pyc")
    # a listed .pyc keeps its package, and the directory it is in then is not claimed
    write(root, "opt/listed/l.py")
    write(root, "opt/listed/__pycache__/l.cpython-311.pyc")
    write(root, "opt/listed/__pycache__/other.cpython-311.pyc")
    write(root, "opt/listed/m.py")
    write(root, "opt/listed/__pycache__/m.cpython-311.pyc")  # listed by q, its source by p: q's
    p = pkg("python3-mod", FileRecord(f"/{mod}"), FileRecord(f"/{mod}/__init__.py"),
            FileRecord(f"/{mod}/helper.py"), FileRecord("/opt/two/a.py"), FileRecord("/opt/listed/l.py"),
            FileRecord("/opt/listed/m.py"),
            FileRecord("/opt/edited/e.py", digest=md5(b"shipped"), digest_algo="md5"))
    q = pkg("python3-two", FileRecord("/opt/two/b.py"), FileRecord("/opt/listed/__pycache__/other.cpython-311.pyc"),
            FileRecord("/opt/listed/__pycache__/m.cpython-311.pyc"))
    h = homes(own(root, p, q))
    for name in ("__init__.cpython-311.pyc", "helper.cpython-311.opt-1.pyc", "helper.cpython-311.opt-2.pyc",
                 "helper.pypy-73.pyc"):
        assert h[f"{mod}/__pycache__/{name}"] == p.key, name
    assert h[f"{mod}/__pycache__/helper.cpython-311.pyc.tmp"] == "unowned"
    assert h[f"{mod}/__pycache__"] == "unowned"  # it also holds an unowned file
    assert h["opt/edited/__pycache__/e.cpython-311.pyc"] == h["opt/edited/__pycache__"] == "unowned"
    assert h["opt/two/__pycache__/a.cpython-311.pyc"] == p.key
    assert h["opt/two/__pycache__/b.cpython-311.pyc"] == q.key
    assert h["opt/two/__pycache__"] == "unowned"
    assert h["srv/__pycache__/local.cpython-311.pyc"] == h["srv/__pycache__"] == "unowned"
    assert h["opt/listed/__pycache__/l.cpython-311.pyc"] == p.key
    assert h["opt/listed/__pycache__/m.cpython-311.pyc"] == q.key
    assert h["opt/listed/__pycache__"] == "unowned"

    (root / f"{mod}/__pycache__/helper.cpython-311.pyc.tmp").unlink()
    assert homes(own(root, p, q))[f"{mod}/__pycache__"] == p.key  # now all of it is p's


# ------------------------------------------------------------------ components users declare


def tag(path: Path, value: bytes, name: str = "user.component") -> None:
    os.setxattr(path, name, value, follow_symlinks=False)


def declared(o: Ownership, name: str) -> str:
    (key,) = [k for k, p in o.packages.items() if p.name == name]
    return key


def test_xattr_tags_claim_unowned_objects_the_nearest_tag_winning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_path / "root"
    write(root, "opt/tools/bin/tool")
    write(root, "opt/tools/special/s")
    write(root, "opt/tools/bad/b")
    write(root, "opt/tools/notutf8")
    write(root, "opt/tools/reserved")
    write(root, "opt/tools/packaged")
    (root / "opt/tools/special/link").symlink_to("s")
    tag(root / "opt/tools", b"tools")
    tag(root / "opt/tools", b"monthly", "user.update-interval")
    tag(root / "opt/tools/special", b"special")
    tag(root / "opt/tools/special/s", b"7", "user.update-interval")
    tag(root / "opt/tools/bad", b"-bad name")  # not a name: what is below keeps "tools"
    tag(root / "opt/tools/notutf8", b"\xff")
    tag(root / "opt/tools/reserved", b"coreutils")  # a package's source name
    tag(root / "opt/tools/packaged", b"tools")
    tag(root / "opt/tools/packaged", b"daily", "user.update-interval")  # a package's file: not the tag's
    write(root, "srv/untagged")
    core = pkg("ls", FileRecord("/opt/tools/packaged"), source="coreutils")
    o = own(root, core)
    h = homes(o)
    tools, special = declared(o, "tools"), declared(o, "special")
    assert re.fullmatch(r"tools-[0-9a-f]{12}", tools) and re.fullmatch(r"special-[0-9a-f]{12}", special)
    for path in ("opt/tools", "opt/tools/bin", "opt/tools/bin/tool", "opt/tools/bad", "opt/tools/bad/b",
                 "opt/tools/notutf8", "opt/tools/reserved"):
        assert h[path] == tools, path
    assert h["opt/tools/special"] == h["opt/tools/special/s"] == h["opt/tools/special/link"] == special
    assert h["opt/tools/packaged"] == core.key
    assert h["srv/untagged"] == h["srv"] == h["opt"] == "unowned"
    assert o.intervals == {"tools": (30, "user.update-interval on /opt/tools"),
                           "special": (7, "user.update-interval on /opt/tools/special/s")}
    assert o.origin(tools) == o.origin(special) == "xattr"
    assert "modified" not in o.homes and o.home_bytes("modified") == 0  # `pkglayer plan` lists every top layer
    assert o.packages[tools].source == "tools" and o.packages[tools].arch == ""
    assert len(o.warnings) == 3
    assert "/opt/tools/bad: user.component '-bad name' is not a valid layer name" in o.warnings[0]
    assert o.warnings[1] == "/opt/tools/notutf8: user.component '\\\\xff' is not UTF-8; ignored"
    assert o.warnings[2] == ("/opt/tools/reserved: user.component 'coreutils' is the name of a package "
                             "component or a top layer; ignored")
    # and each warning is logged as it is found (the CLI shows them)
    assert [(r.levelname, r.getMessage()) for r in caplog.records if r.name == "pkglayer.ownership"] == [
        ("WARNING", w) for w in o.warnings]


def test_tagged_intervals_must_agree_and_be_intervals(tmp_path: Path) -> None:
    root = tmp_path / "root"
    write(root, "opt/a/one")
    write(root, "opt/a/two")
    tag(root / "opt/a", b"app")
    tag(root / "opt/a/one", b"sometimes", "user.update-interval")
    o = own(root)
    assert homes(o)["opt/a/one"] == declared(o, "app") and "app" not in o.intervals
    assert o.warnings == ["/opt/a/one: user.update-interval 'sometimes' is not an interval; ignored"]
    tag(root / "opt/a/one", b"\xffweekly", "user.update-interval")
    assert own(root).warnings == ["/opt/a/one: user.update-interval '\\\\xffweekly' is not an interval; ignored"]
    tag(root / "opt/a/one", b"weekly", "user.update-interval")
    tag(root / "opt/a/two", b"3", "user.update-interval")
    with pytest.raises(ConfigError) as e:
        own(root)
    assert str(e.value) == ("component 'app' has conflicting update intervals: 3 days from "
                            "user.update-interval on /opt/a/two; 7 days from user.update-interval on /opt/a/one")


def test_config_globs_claim_unowned_objects_and_what_is_below_matching_directories(tmp_path: Path) -> None:
    root = tmp_path / "root"
    write(root, "opt/app/main.py")
    write(root, "opt/app/lib/util.py")
    write(root, "opt/app/lib/.hidden")
    write(root, "opt/app/packaged")
    write(root, "opt/app/tagged")
    write(root, "opt/data/set/x.csv")
    write(root, "opt/data/readme")
    write(root, "opt/data/deep/er/y.csv")  # ** crosses directories
    write(root, "opt/dots/.rc")  # * matches a leading dot, as in the rootfs's own paths
    tag(root / "opt/app/tagged", b"tagged")  # tags come first
    specs = (
        ComponentSpec("app", ("opt/app",), "daily", "component[0] in test.toml"),
        ComponentSpec("data", ("opt/data/**/*.csv", "opt/app"), None, "--component"),
        ComponentSpec("lib", ("opt/app/lib",), None, "--component"),
        ComponentSpec("dots", ("opt/dots/*",), None, "--component"),
    )
    p = pkg("p", FileRecord("/opt/app/packaged"))
    o = own(root, p, components=specs)
    h = homes(o)
    app, data, lib = declared(o, "app"), declared(o, "data"), declared(o, "lib")
    assert h["opt/app"] == h["opt/app/main.py"] == app  # "app" is listed before "data", which matches too
    assert h["opt/app/lib"] == h["opt/app/lib/util.py"] == h["opt/app/lib/.hidden"] == lib  # nearest
    assert h["opt/data/set/x.csv"] == h["opt/data/deep/er/y.csv"] == data
    assert h["opt/dots/.rc"] == declared(o, "dots")
    assert h["opt/data/readme"] == h["opt/data/set"] == "unowned"
    assert h["opt/app/packaged"] == p.key and h["opt/app/tagged"] == declared(o, "tagged")
    assert o.intervals == {"app": (1, "component[0] in test.toml")}
    assert o.origin(app) == "config"

    # a name given by a tag and by the configuration is one component
    tag(root / "opt/data/readme", b"app")
    both = own(root, p, components=specs)
    assert homes(both)["opt/data/readme"] == homes(both)["opt/app"] == declared(both, "app")
    assert both.origin(declared(both, "app")) == "xattr, config"


@pytest.mark.parametrize("name", ["unowned", "pkgdb", "src", "p-1.0-amd64", "q"])
def test_a_config_component_cannot_take_a_reserved_name(tmp_path: Path, name: str) -> None:
    root = tmp_path / "root"
    write(root, "opt/x")
    with pytest.raises(ConfigError) as e:
        own(root, pkg("p", source="src"), pkg("q"), components=(ComponentSpec(name, ("opt",), None, "--component"),))
    assert str(e.value) == (f"--component: component '{name}' has the name of a package component or a top layer; "
                            "choose another")


def test_big_unowned_files_become_components_of_their_own(tmp_path: Path) -> None:
    root = tmp_path / "root"
    write(root, "srv/model.bin", b"m" * 1000)
    write(root, "srv/exactly", b"e" * 100)
    write(root, "srv/small", b"s" * 99)
    write(root, "srv/packaged", b"p" * 1000)
    write(root, "srv/tagged", b"t" * 1000)
    tag(root / "srv/tagged", b"tagged")
    write(root, "srv/links/a", b"l" * 500)
    os.link(root / "srv/links/a", root / "srv/links/b")
    write(root, "srv/half/a", b"h" * 500)  # linked to a package's file: left to the hard-link rule
    os.link(root / "srv/half/a", root / "srv/packaged-link")
    (root / "srv/big-link").symlink_to("model.bin")
    p = pkg("p", FileRecord("/srv/packaged"), FileRecord("/srv/packaged-link"))
    o = own(root, p, big_file_size=100)
    h = homes(o)
    for path in ("srv/model.bin", "srv/exactly"):
        assert h[path] == declared(o, big_file_name(path)), path
        assert o.origin(h[path]) == "big file"
    assert h["srv/links/a"] == h["srv/links/b"] == declared(o, big_file_name("srv/links/a"))
    assert h["srv/small"] == h["srv/big-link"] == h["srv"] == "unowned"
    assert h["srv/packaged"] == p.key and h["srv/tagged"] == declared(o, "tagged")
    assert h["srv/half/a"] == h["srv/packaged-link"] == "unowned"  # the set's highest home
    assert all(not k.startswith("file:") for k in homes(own(root, p)).values())  # off by default


def test_only_the_largest_big_files_get_components(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = tmp_path / "root"
    for i in range(MAX_BIG_FILES + 2):
        write(root, f"srv/f{i:03d}", b"x" * (i + 10))
    write(root, "srv/tie-a", b"x" * 11)  # as large as the largest one left out: the path decides
    with caplog.at_level(logging.INFO, logger="pkglayer.ownership"):
        h = homes(own(root, big_file_size=1))
    left = sorted(p for p, home in h.items() if home == "unowned")
    assert left == ["srv", "srv/f000", "srv/f001", "srv/tie-a"]
    assert [r.getMessage() for r in caplog.records if r.name == "pkglayer.ownership"] == [
        f"{MAX_BIG_FILES + 3} big unowned files; the {MAX_BIG_FILES} largest get components of their own"]
    # exactly as many as allowed: all of them, and nothing to say
    caplog.clear()
    for path in left[1:]:
        (root / path).unlink()
    with caplog.at_level(logging.INFO, logger="pkglayer.ownership"):
        h = homes(own(root, big_file_size=1))
    assert sorted(p for p, home in h.items() if home == "unowned") == ["srv"]
    assert [r for r in caplog.records if r.name == "pkglayer.ownership"] == []


def test_a_split_hard_link_set_moves_to_the_highest_home(tmp_path: Path) -> None:
    root = tmp_path / "root"
    sets = {"pkg-pkg": ("a", "b"), "pkg-unowned": ("a", None), "unowned-db": (None, "db"),
            "modified-pkg": ("edited", "b"), "zpkg-unowned": ("zz", None)}
    for name in sets:  # the values: who lists each of the two names
        write(root, f"one/{name}", name.encode())
        (root / "two").mkdir(exist_ok=True)
        os.link(root / f"one/{name}", root / f"two/{name}")
    write(root, f"{DB}/x")
    os.link(root / "one/unowned-db", root / f"{DB}-link")
    os.link(root / "one/unowned-db", root / f"{DB}/x-link")
    a = pkg("a", FileRecord("/one/pkg-pkg"), FileRecord("/one/pkg-unowned"))
    b = pkg("b", FileRecord("/two/pkg-pkg"), FileRecord("/two/modified-pkg"))
    edited = pkg("edited", FileRecord("/one/modified-pkg", digest=md5(b"other"), digest_algo="md5"))
    zz = pkg("zz", FileRecord("/one/zpkg-unowned"))  # a name after "unowned": ranks still win
    h = homes(own(root, a, b, edited, zz))
    assert h["one/pkg-pkg"] == h["two/pkg-pkg"] == b.key  # between packages: by name
    assert h["one/pkg-unowned"] == h["two/pkg-unowned"] == "unowned"
    assert h["one/zpkg-unowned"] == h["two/zpkg-unowned"] == "unowned"
    assert h["one/unowned-db"] == h["two/unowned-db"] == h[f"{DB}/x-link"] == h[f"{DB}-link"] == "pkgdb"
    assert h["one/modified-pkg"] == h["two/modified-pkg"] == "modified"
    assert h[f"{DB}/x"] == "pkgdb"


# ------------------------------------------------------------------ the walk behind the rules


def test_by_default_files_are_hashed_and_other_filesystems_and_sockets_left_out(tmp_path: Path) -> None:
    root = tmp_path / "root"
    write(root, "srv/f", b"data")
    write(root, "mnt/.keep")
    with tmpfs(root / "mnt/other"):
        write(root, "mnt/other/elsewhere")
        with socket.socket(socket.AF_UNIX) as s:
            s.bind(str(root / "srv/sock"))
            o = own(root)
    assert o.skipped == [("mnt/other", "mount point: contents on another filesystem not included"),
                         ("srv/sock", "socket (tar cannot store sockets)")]
    assert "mnt/other/elsewhere" not in o.objects and "srv/sock" not in o.objects
    h = new_hasher(CONTENT_HASH)
    h.update(b"data")
    assert o.objects["srv/f"].content_hash == h.hexdigest()
