"""Components users declare (user.component xattrs set with setfattr, [[component]]
tables, --component) and big unowned files, on a copy of a real Debian root; and a
pacman root built end to end."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from pkglayer.build import plan_rootfs, scan_rootfs
from pkglayer.config import BuildSettings, load_settings
from pkglayer.daemon.config import load_daemon_config
from pkglayer.errors import ConfigError
from pkglayer.ownership import Ownership
from pkglayer.rootfs import Rootfs
from pkglayer.usercomponents import ComponentSpec, big_file_name, shown, spec_from_argument
from tests import rootfs_factory as factory
from tests.helpers import build_into_layers

REPO = Path(__file__).resolve().parent.parent
TOP = {"unowned", "modified", "pkgdb"}
MODEL = "srv/models/model.bin"
APP = ComponentSpec("app", ("opt/app",), "daily", "test")


def setfattr(path: Path, name: str, value: str) -> None:
    subprocess.run(["setfattr", "-n", name, "-v", value, str(path)], check=True)


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pkglayer", *args], capture_output=True, text=True)


def make_app_root(deb_rootfs: Path, root: Path) -> None:
    """What an application image adds to a Debian root: an application copied into
    /opt/app (pkglayer's own sources), tools tagged with setfattr, a 3 MiB model."""
    factory.copy_tree(deb_rootfs, root)
    subprocess.run(["cp", "-a", str(REPO / "pkglayer"), str(root / "opt/app")], check=True)
    tools = root / "opt/tools"
    (tools / "bin").mkdir(parents=True)
    (tools / "bin/tool").write_text("#!/bin/sh\necho tool\n")
    (tools / "share").mkdir()
    (tools / "share/data.txt").write_text("data\n")
    (tools / "special").write_text("special\n")
    (tools / "etc").symlink_to("/etc")
    setfattr(tools, "user.component", "tools")
    setfattr(tools, "user.update-interval", "monthly")
    setfattr(tools / "special", "user.component", "special")
    setfattr(root / "usr/bin/ls", "user.component", "tools")  # coreutils' file: dpkg wins
    setfattr(root / "usr/bin/ls", "user.update-interval", "daily")  # ...and its interval is not the tag's
    (root / MODEL).parent.mkdir(parents=True)
    (root / MODEL).write_bytes(os.urandom(3 << 20))


@pytest.fixture(scope="module")
def app_root(deb_rootfs: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("app") / "root"
    make_app_root(deb_rootfs, root)
    return root


@pytest.fixture
def app_copy(app_root: Path, tmp_path: Path) -> Path:
    root = tmp_path / "root"
    factory.copy_tree(app_root, root)
    return root


def scan(root: Path, **settings) -> Ownership:
    with Rootfs(str(root)) as rootfs:
        return scan_rootfs(rootfs, BuildSettings(hash_cache="", **settings))


def home_of(own: Ownership, path: str) -> str:
    return own.objects[path].home


def test_setfattr_tags_make_components_packages_keep_their_files(app_root: Path) -> None:
    own = scan(app_root)
    tools = home_of(own, "opt/tools")
    assert tools.startswith("tools-") and own.origin(tools) == "xattr"
    for path in ("opt/tools/bin", "opt/tools/bin/tool", "opt/tools/share/data.txt", "opt/tools/etc"):
        assert home_of(own, path) == tools, path
    assert own.objects["opt/tools/etc"].linkname == "/etc"  # stored as a link, never followed
    assert home_of(own, "opt/tools/special").startswith("special-")
    assert home_of(own, "usr/bin/ls").startswith("coreutils-")
    assert home_of(own, "etc/passwd") == "unowned"
    assert own.intervals["tools"] == (30, "user.update-interval on /opt/tools")
    assert own.warnings == []
    comps = {c.name: c for c in plan_rootfs(str(app_root), BuildSettings(hash_cache=""))[1]}
    assert comps["tools"].rate.weekly == pytest.approx(7 / 30)
    assert comps["tools"].rate.explain() == "every 30 days (user.update-interval on /opt/tools)"
    assert comps["special"].rate.explain() == "default 0.25/week" and comps["special"].origin == "xattr"
    # same tree, same keys: the version is a fingerprint of what the layer would hold
    assert home_of(scan(app_root), "opt/tools") == tools


def test_config_component_takes_the_app_directory_and_tags_win(app_root: Path, tmp_path: Path) -> None:
    conf = tmp_path / "c.toml"
    conf.write_text('[[component]]\nname = "app"\npaths = ["/opt/app"]\nupdate-interval = "daily"\n')
    settings = load_settings(str(conf), BuildSettings(hash_cache=""))
    assert settings.components == (ComponentSpec("app", ("opt/app",), "daily", f"component[0] in {conf}"),)
    with Rootfs(str(app_root)) as rootfs:
        own = scan_rootfs(rootfs, settings)
    app = home_of(own, "opt/app/cli.py")
    assert app.startswith("app-") and own.origin(app) == "config"
    under = [o for p, o in own.objects.items() if p == "opt/app" or p.startswith("opt/app/")]
    assert len(under) > 40 and {o.home for o in under} == {app}
    assert home_of(own, "opt/tools/bin/tool").startswith("tools-")  # not matched: still the tag's

    plan = json.loads(cli("plan", str(app_root), "--config", str(conf), "--no-hash-cache", "--json").stdout)
    comps = {c["name"]: c for layer in plan["layers"] for c in layer["components"]}
    assert comps["app"]["origin"] == "config" and comps["app"]["weekly"] == 1.0
    assert comps["app"]["evidence"] == f"every day (component[0] in {conf})"
    assert comps["tools"]["origin"] == "xattr" and comps[big_file_name(MODEL)]["origin"] == "big file"
    assert comps["coreutils"]["origin"] == "dpkg"
    text = cli("plan", str(app_root), "--config", str(conf), "--no-hash-cache").stdout
    assert "components beyond the package database:" in text
    assert any(line.split()[:2] == ["app", "config"] for line in text.splitlines())

    # --component on the command line; a tag inside the directory wins over the glob
    setfattr_root = tmp_path / "tagged"
    factory.copy_tree(app_root, setfattr_root)
    setfattr(setfattr_root / "opt/app/cli.py", "user.component", "tools")
    scanned = json.loads(cli("scan", str(setfattr_root), "--component", "app=opt/app", "--no-hash-cache",
                             "--json").stdout)
    by_name = {c["name"]: c for c in scanned["components"]}
    assert by_name["app"]["origin"] == "config" and by_name["tools"]["origin"] == "xattr"
    pkgs = {p["key"]: p for p in scanned["packages"]}
    tools_key = next(k for k in pkgs if k.startswith("tools-"))
    assert pkgs[tools_key]["files"] == 7  # the six under /opt/tools and /opt/app/cli.py


def test_same_name_from_a_tag_and_the_configuration_is_one_component(app_root: Path) -> None:
    own = scan(app_root, components=(ComponentSpec("tools", ("opt/app",), None, "test"),))
    assert home_of(own, "opt/app/cli.py") == home_of(own, "opt/tools/bin/tool")
    assert own.origin(home_of(own, "opt/app/cli.py")) == "xattr, config"


def test_big_unowned_file_is_a_component_of_its_own(app_root: Path) -> None:
    own = scan(app_root)
    key = home_of(own, MODEL)
    assert key.startswith("file:srv:models:model.bin-") and own.origin(key) == "big file"
    assert [o.path for o in own.homes[key]] == [MODEL]
    assert home_of(own, "srv/models") == "unowned"
    assert home_of(scan(app_root, big_file_size=4 << 20), MODEL) == "unowned"
    assert home_of(scan(app_root, big_file_size=3 << 20), MODEL) == key  # "at least"


def test_hard_links_to_a_big_file_are_one_component(app_copy: Path) -> None:
    os.link(app_copy / MODEL, app_copy / "srv/models/same.bin")
    os.link(app_copy / "etc/passwd", app_copy / "srv/passwd-link")  # small: stays with the rest
    own = scan(app_copy)
    key = home_of(own, MODEL)
    assert key.startswith("file:srv:models:model.bin-")
    assert sorted(o.path for o in own.homes[key]) == [MODEL, "srv/models/same.bin"]


def test_names_are_stable_valid_and_distinct() -> None:
    assert big_file_name("srv/models/model.bin") == "file:srv:models:model.bin"
    assert big_file_name("a/b") != big_file_name("a:b") != big_file_name("a^3ab")
    assert big_file_name("x/ü y") == "file:x:^c3^bc^20y"
    deep = "d/" * 300 + "weights.safetensors"
    long = big_file_name(deep)
    assert len(long) <= 200 and long.endswith("weights.safetensors") and long == big_file_name(deep)
    assert long != big_file_name("e/" + "d/" * 299 + "weights.safetensors")


def _layer_tar(layers: Path, digest: str) -> tarfile.TarFile:
    for d in ("output", "input"):
        blob = layers / d / "blobs/sha256" / digest[7:]
        if blob.exists():
            return tarfile.open(fileobj=gzip.open(blob), mode="r:")
    raise AssertionError(f"blob {digest} not found")


def test_changes_reship_only_their_own_layer(app_root: Path, tmp_path: Path) -> None:
    root = tmp_path / "root"
    factory.copy_tree(app_root, root)
    layers = tmp_path / "layers"
    # room for every component: a change shows in its own layer only
    settings = BuildSettings(hash_cache="", components=(APP,), max_layers=100)

    def rebuild():
        # as a build system does between builds: the new blobs join the input
        (layers / "input/blobs/sha256").mkdir(parents=True, exist_ok=True)
        if (layers / "output").exists():
            for blob in (layers / "output/blobs/sha256").iterdir():
                blob.rename(layers / "input/blobs/sha256" / blob.name)
            shutil.rmtree(layers / "output")
        result = build_into_layers(root, settings, layers)
        return result, {o.record.name for o in result.layers if not o.reused}

    first, _ = rebuild()
    names = {o.record.name for o in first.layers}
    holding = {c: next(o.record for o in first.layers if c in o.record.components)
               for c in ("app", "tools", "special", big_file_name(MODEL))}
    # each declared component and the big file have a layer of their own at this budget
    assert all(len(rec.components) == 1 for rec in holding.values()), holding
    # the tags are kept in the layer: a rebuild from the image finds the same components
    with _layer_tar(layers, holding["tools"].digest) as tf:
        member = tf.getmember("opt/tools")
        assert member.pax_headers["SCHILY.xattr.user.component"] == "tools"
        assert member.pax_headers["SCHILY.xattr.user.update-interval"] == "monthly"

    (root / "etc/motd").write_text("changed\n")
    _, written = rebuild()
    assert written == {"unowned"}

    with open(root / MODEL, "ab") as f:
        f.write(b"more weights")
    result, written = rebuild()
    assert len(written) == 1 and next(iter(written)).startswith("file:srv:models:model.bin-")
    assert written.isdisjoint(names)  # a new fingerprint: a new name, like an upgraded package

    (root / "opt/app/cli.py").write_text("# the next release\n")
    result, written = rebuild()
    assert len(written) == 1 and next(iter(written)).startswith("app-")
    # the planner saw the changes as it sees package upgrades
    assert result.history.components["app"].changes == 1
    assert result.history.components[big_file_name(MODEL)].changes == 1
    assert result.history.components["tools"].changes == 0


def test_conflicting_intervals_are_a_one_line_error(app_copy: Path) -> None:
    setfattr(app_copy / "opt/tools/bin/tool", "user.update-interval", "weekly")
    proc = cli("scan", str(app_copy), "--no-hash-cache")
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1
    assert proc.stderr == (
        "pkglayer: error: component 'tools' has conflicting update intervals: 7 days from user.update-interval "
        "on /opt/tools/bin/tool; 30 days from user.update-interval on /opt/tools\n"
    )
    conf = app_copy.parent / "c.toml"
    conf.write_text('[[component]]\nname = "special"\npaths = ["srv"]\nupdate-interval = 3\n')
    setfattr(app_copy / "opt/tools/bin/tool", "user.update-interval", "monthly")
    setfattr(app_copy / "opt/tools/special", "user.update-interval", "yearly")
    proc = cli("scan", str(app_copy), "--no-hash-cache", "--config", str(conf))
    assert proc.returncode == 1 and "component 'special' has conflicting update intervals: 3 days from " \
        f"component[0] in {conf}; 365 days from user.update-interval on /opt/tools/special" in proc.stderr


@pytest.mark.parametrize(
    "value, problem",
    [
        ("../../etc", "not a valid layer name"),
        ("two words", "not a valid layer name"),
        ("x" * 201, "longer than 200 characters"),
        ("unowned", "the name of a package component or a top layer"),
        ("coreutils", "the name of a package component or a top layer"),
        ("file:srv:models:model.bin", "reserved for big files' components"),
        ("my-tools_1.0", None),  # a valid name, for contrast
    ],
)
def test_unusable_tag_is_warned_about_and_ignored(app_copy: Path, value: str, problem: str | None) -> None:
    (app_copy / "srv/tagged").write_text("x\n")
    setfattr(app_copy / "srv/tagged", "user.component", value)
    own = scan(app_copy)
    if problem is None:
        assert home_of(own, "srv/tagged").startswith(value + "-") and own.warnings == []
        return
    assert home_of(own, "srv/tagged") == "unowned"
    (warning,) = own.warnings
    assert warning.startswith("/srv/tagged: user.component ") and warning.endswith("; ignored")
    assert f" is {problem}" in warning
    assert len(warning) < 200


def test_tag_that_is_not_utf8_or_not_an_interval(app_copy: Path) -> None:
    subprocess.run(["setfattr", "-n", "user.component", "-v", "0xfffe41", str(app_copy / "opt/tools/special")],
                   check=True)
    setfattr(app_copy / "opt/tools/share", "user.update-interval", "fortnightly")
    own = scan(app_copy)
    assert home_of(own, "opt/tools/special") == home_of(own, "opt/tools")  # inherits from above
    value = shown(b"\xff\xfeA")
    assert own.warnings == [  # in walk order
        "/opt/tools/share: user.update-interval 'fortnightly' is not an interval; ignored",
        f"/opt/tools/special: user.component {value} is not UTF-8; ignored",
    ]
    assert own.intervals["tools"][0] == 30


def test_64k_tag_on_tmpfs(tmp_path: Path) -> None:
    """The largest value Linux allows (ext4 holds 4 KiB; tmpfs holds 64 KiB)."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mnt)], check=True)
    try:
        (mnt / "data").mkdir()
        (mnt / "data/file").write_text("x\n")
        (mnt / "data/other").write_text("y\n")
        os.setxattr(mnt / "data/file", "user.component", b"a" * 65536)
        os.setxattr(mnt / "data/other", "user.note", b"n" * 65536)
        own = scan(mnt)
        assert home_of(own, "data/file") == "unowned"
        assert own.warnings == [
            f"/data/file: user.component {'a' * 40!r}... (65536 bytes) is longer than 200 characters; ignored"
        ]
        out = tmp_path / "image"
        proc = cli("build", str(mnt), "--output", f"oci:{out}:t", "--no-hash-cache", "--json", "-q")
        assert proc.returncode == 0, proc.stderr
        result = json.loads(proc.stdout)
        assert result["warnings"] == own.warnings
        (layer,) = [x for x in result["layers"] if x["name"] == "unowned"]
        with tarfile.open(fileobj=gzip.open(out / "blobs/sha256" / layer["digest"][7:]), mode="r:") as tf:
            assert tf.getmember("data/file").pax_headers["SCHILY.xattr.user.component"] == "a" * 65536
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


@pytest.mark.parametrize(
    "table, message",
    [
        ('name = "bad name"\npaths = ["opt"]', r"component\[0\]\.name: 'bad name' is not a valid layer name"),
        ('name = "app"\npaths = []', r"component\[0\]\.paths: must be a non-empty list"),
        ('name = "app"\npaths = ["opt"]\nupdate-interval = "fortnightly"', r"update-interval: must be daily"),
        ('name = "app"\npaths = ["opt"]\nupdate-interval = 0', r"update-interval: must be daily"),
        ('name = "app"\npaths = ["opt"]\nowner = "me"', r"component\[0\]\.owner: unknown setting"),
    ],
)
def test_bad_component_tables_are_one_line_errors(tmp_path: Path, table: str, message: str) -> None:
    conf = tmp_path / "c.toml"
    conf.write_text(f"[[component]]\n{table}\n")
    with pytest.raises(ConfigError, match=message):
        load_settings(str(conf))
    proc = cli("scan", str(tmp_path), "--config", str(conf))
    assert proc.returncode == 1 and proc.stderr.startswith(f"pkglayer: error: {conf}: component[0].")
    assert proc.stderr.count("\n") == 1


def test_component_names_taken_by_packages_or_invalid_are_refused(app_root: Path) -> None:
    proc = cli("scan", str(app_root), "--component", "coreutils=opt/app", "--no-hash-cache")
    assert proc.returncode == 1 and proc.stderr == (
        "pkglayer: error: --component: component 'coreutils' has the name of a package component or a top "
        "layer; choose another\n"
    )
    for bad in ("../x=opt/app", "x y=opt", "=opt", "app"):
        proc = cli("scan", str(app_root), "--component", bad)
        assert proc.returncode == 1 and proc.stderr.startswith("pkglayer: error: --component") and \
            proc.stderr.count("\n") == 1, proc.stderr
    with pytest.raises(ConfigError, match="NAME=GLOB"):
        spec_from_argument("app")


def test_globs_never_follow_symlinks(app_copy: Path) -> None:
    (app_copy / "opt/usr-link").symlink_to("/usr")
    own = scan(app_copy, components=(ComponentSpec("linked", ("opt/usr-link/**", "opt/usr-link"), None, "t"),))
    assert home_of(own, "opt/usr-link").startswith("linked-")
    assert not any(p.startswith("opt/usr-link/") for p in own.objects)
    assert home_of(own, "usr/bin/ls").startswith("coreutils-")


def test_daemon_roots_take_components_and_big_file_size(tmp_path: Path) -> None:
    conf = tmp_path / "d.toml"
    conf.write_text(
        '[[component]]\nname = "app"\npaths = ["opt/app"]\n'
        '[[root]]\nname = "a"\npath = "/srv/a"\nbig-file-size = "8Mi"\n'
        '[[root.component]]\nname = "models"\npaths = ["srv/models"]\nupdate-interval = "quarterly"\n'
        '[[root]]\nname = "b"\npath = "/srv/b"\n'
    )
    config = load_daemon_config(str(conf))
    a, b = config.roots
    assert [c.name for c in a.settings.components] == ["app", "models"] and a.settings.big_file_size == 8 << 20
    assert a.settings.components[1].where == "root[0].component[0]"
    assert [c.name for c in b.settings.components] == ["app"] and b.settings.big_file_size == 1 << 20
    conf.write_text('[[root]]\nname = "a"\npath = "/srv/a"\n[[root.component]]\nname = "a b"\npaths = ["x"]\n')
    with pytest.raises(ConfigError, match=r"d\.toml: root\[0\]\.component\[0\]\.name: 'a b' is not a valid"):
        load_daemon_config(str(conf))


def test_pacman_root_builds_and_an_upgrade_reships_one_layer(
    pacman_upgrade_pair: factory.UpgradePair, tmp_path: Path
) -> None:
    layers = tmp_path / "layers"
    settings = BuildSettings(hash_cache="")
    old = build_into_layers(pacman_upgrade_pair.old, settings, layers)
    assert {old.ownership.origin(k) for k in old.ownership.packages} == {"pacman"}
    assert {c.origin for c in old.components if not c.special} == {"pacman"}
    (layers / "output").rename(layers / "input")
    new = build_into_layers(pacman_upgrade_pair.new, settings, layers)
    written = {o.record.name: o.record.packages for o in new.layers if not o.reused}
    hello = next(k for k in new.ownership.packages if k.startswith("pkglayer-hello-"))
    assert hello == "pkglayer-hello-1:1.1-1-x86_64"
    assert set(written) - TOP == {next(n for n, keys in written.items() if hello in keys)}
    assert "pkgdb" in written
