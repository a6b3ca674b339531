"""pip's packages in the pipeline: homes beside the distro's, edits, bytecode, layers,
an upgrade, the daemon; on the Debian root where Debian's pip installed PyPI wheels."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pkglayer.build import plan_rootfs, scan_rootfs
from pkglayer.config import BuildSettings
from pkglayer.ownership import Ownership
from pkglayer.rootfs import Rootfs
from pkglayer.sources.pip import PipSource
from tests import rootfs_factory as factory
from tests.daemon_harness import DaemonProcess
from tests.helpers import build_into_layers

SYSTEM_SITE = "usr/local/lib/python3.11/dist-packages"
DEBIAN_SITE = "usr/lib/python3/dist-packages"
TOP = {"unowned", "modified", "pkgdb"}


def scan(root: Path, **settings) -> Ownership:
    with Rootfs(str(root)) as rootfs:
        return scan_rootfs(rootfs, BuildSettings(hash_cache="", **settings))


def pip_records(root: Path) -> dict[str, set[str]]:
    """pip package key -> the rootfs paths its RECORDs list (the reader's view)."""
    with Rootfs(str(root)) as rootfs:
        return {
            p.key: {rootfs.resolve(f.path[1:], follow_final=False) for f in p.files}
            for p in PipSource(rootfs).packages()
        }


@pytest.fixture
def pip_copy(pip_rootfs: Path, tmp_path: Path) -> Path:
    root = tmp_path / "root"
    factory.copy_tree(pip_rootfs, root)
    return root


def test_pip_files_go_to_their_packages_and_the_distros_stay(pip_rootfs: Path) -> None:
    own = scan(pip_rootfs)
    records = pip_records(pip_rootfs)
    assert set(records) == {"pip-idna-3.7", "pip-pyflakes-3.2.0", "pip-six-1.17.0"}
    for key, paths in records.items():
        assert own.origin(key) == "pip"
        assert {o.path for o in own.homes[key]} == paths & own.objects.keys()
        assert paths & own.objects.keys() == paths  # nothing listed is missing
    # the same six 1.17.0 in /usr/local and in the venv: one package, one home
    six = {o.path for o in own.homes["pip-six-1.17.0"]}
    assert f"{SYSTEM_SITE}/six.py" in six and "opt/app/venv/lib/python3.11/site-packages/six.py" in six
    # Debian's six 1.16.0 and pip's own (Debian's python3-pip) stay dpkg's
    assert own.objects[f"{DEBIAN_SITE}/six.py"].home.startswith("python3-six-1.16.0")
    assert own.objects[f"{DEBIAN_SITE}/pip/__init__.py"].home.startswith("python3-pip-")
    # everything in pip's site directory but the directory itself is some pip package's
    below = [o for p, o in own.objects.items() if p.startswith(SYSTEM_SITE + "/")]
    assert below and all(o.home.startswith("pip-") for o in below)
    assert own.objects["usr/local/bin/pyflakes"].home == "pip-pyflakes-3.2.0"
    comps = {c.name: c for c in plan_rootfs(str(pip_rootfs), BuildSettings(hash_cache=""))[1]}
    for name in ("pip-six", "pip-idna", "pip-pyflakes"):
        assert comps[name].origin == "pip"
        assert comps[name].rate.explain() == "pip default 0.25/week"
    assert comps["six"].origin == "dpkg"
    text = subprocess.run([sys.executable, "-m", "pkglayer", "scan", str(pip_rootfs), "--no-hash-cache"],
                          capture_output=True, text=True, check=True).stdout
    rows = {line.split()[0]: line.split() for line in text.splitlines() if line.startswith(("pip-", "six "))}
    assert rows["pip-idna-3.7"][1] == "pip" and rows["six"][1] == "dpkg"
    assert rows["pip-idna"][1] == "pip" and rows["pip-idna"][-4:] == ["0.250", "pip", "default", "0.25/week"]


def test_distro_wins_where_both_list_a_path(pip_copy: Path) -> None:
    """A distribution pip installed into Debian's own site directory (prefix /usr) whose
    RECORD names files dpkg lists, and Debian's pip given an INSTALLER of pip's."""
    site = pip_copy / DEBIAN_SITE
    shutil.copytree(pip_copy / SYSTEM_SITE / "six-1.17.0.dist-info", site / "six-1.17.0.dist-info")
    with open(site / "six-1.17.0.dist-info/RECORD", "a") as f:
        f.write("../../../bin/python3.11,,\n")
    (site / "pip-23.0.1.dist-info/INSTALLER").write_text("pip\n")
    own = scan(pip_copy)
    assert own.objects[f"{DEBIAN_SITE}/six.py"].home.startswith("python3-six-1.16.0")
    assert own.objects["usr/bin/python3.11"].home.startswith("python3.11-")
    shared = own.shared[f"{DEBIAN_SITE}/six.py"]
    assert shared[0].startswith("python3-six-1.16.0") and "pip-six-1.17.0" in shared
    assert "usr/bin/python3.11" in own.shared
    # Debian's pip is dpkg's whole: left to the distro, reported
    assert [k for k, _ in own.dropped] == ["pip-pip-23.0.1"]
    assert own.dropped[0][1].startswith(f"/{DEBIAN_SITE}/pip-23.0.1.dist-info") and "python3-pip-" in own.dropped[0][1]
    assert "pip-pip-23.0.1" not in own.packages
    # the pip-installed copy's own dist-info is pip's (nobody else lists it)
    assert own.objects[f"{DEBIAN_SITE}/six-1.17.0.dist-info/METADATA"].home == "pip-six-1.17.0"


def test_edited_file_is_modified_and_later_bytecode_goes_with_its_package(pip_copy: Path) -> None:
    core = pip_copy / SYSTEM_SITE / "idna/core.py"
    with open(core, "a") as f:
        f.write("# edited after installation\n")
    # bytecode pip did not write: the optimised level, compiled later
    subprocess.run([sys.executable, "-O", "-m", "compileall", "-q", pip_copy / SYSTEM_SITE / "idna"], check=True)
    own = scan(pip_copy)
    rel = f"{SYSTEM_SITE}/idna/core.py"
    assert own.objects[rel].home == "modified" and rel in own.modified
    assert [o.path for o, _ in own.modified_by_package["pip-idna-3.7"]] == [rel]
    assert own.objects[f"{SYSTEM_SITE}/idna/codec.py"].home == "pip-idna-3.7"
    opt = [p for p in own.objects if p.startswith(f"{SYSTEM_SITE}/idna/__pycache__/") and ".opt-1." in p]
    homes = {p.rsplit("/", 1)[1].split(".")[0]: own.objects[p].home for p in opt}
    assert len(homes) > 3 and homes.pop("core") == "unowned"  # compiled from the edited file
    assert set(homes.values()) == {"pip-idna-3.7"}
    assert not any(p in pip_records(pip_copy)["pip-idna-3.7"] for p in opt)  # RECORD does not list them


@pytest.mark.parametrize(
    "row",
    [
        "../../../../../../../../etc/passwd,,",
        "/etc/passwd,,",
        "../../../../bin/bash,,",
        "evil/passwd,,",
        "dup/six.py,,",
    ],
)
def test_hostile_record_claims_nothing_outside_its_environment(pip_copy: Path, row: str) -> None:
    site = pip_copy / SYSTEM_SITE
    (site / "evil").symlink_to("/etc")
    (site / "dup").symlink_to(".")
    before = scan(pip_copy)
    with open(site / "six-1.17.0.dist-info/RECORD", "a") as f:
        f.write(row + "\n")
    own = scan(pip_copy)
    for path in ("etc/passwd", "usr/bin/bash", f"{SYSTEM_SITE}/evil", f"{SYSTEM_SITE}/dup"):
        assert own.objects[path].home == before.objects[path].home, path
        assert not own.objects[path].home.startswith("pip-")
    assert {p: o.home for p, o in own.objects.items()} == {p: o.home for p, o in before.objects.items()}


def test_malformed_metadata_leaves_that_copy_unowned(pip_copy: Path, caplog: pytest.LogCaptureFixture) -> None:
    (pip_copy / SYSTEM_SITE / "six-1.17.0.dist-info/METADATA").write_bytes(b"\x7fELF\x02\x01 not metadata")
    own = scan(pip_copy)
    assert "six-1.17.0.dist-info/METADATA: no valid Name and Version; files stay unowned" in caplog.text
    assert own.objects[f"{SYSTEM_SITE}/six.py"].home == "unowned"
    # the venv's copy of the same distribution is still read, and keeps only its own files
    assert {o.path.split("/")[0] for o in own.homes["pip-six-1.17.0"]} == {"opt"}


def test_a_path_two_pip_packages_list_goes_to_the_first(pip_copy: Path) -> None:
    site = pip_copy / SYSTEM_SITE
    twin = site / "six_twin-1.0.dist-info"
    shutil.copytree(site / "six-1.17.0.dist-info", twin)
    (twin / "METADATA").write_text("Metadata-Version: 2.1\nName: six-twin\nVersion: 1.0\n")
    own = scan(pip_copy)
    assert own.objects[f"{SYSTEM_SITE}/six.py"].home == "pip-six-1.17.0"
    assert own.shared[f"{SYSTEM_SITE}/six.py"] == ["pip-six-1.17.0", "pip-six-twin-1.0"]
    # its RECORD is six's: it lists nothing six has not claimed first
    assert "pip-six-twin-1.0" in own.packages and "pip-six-twin-1.0" not in own.homes


def test_pip_upgrade_reships_that_packages_layer_only(
    pip_upgrade_pair: factory.UpgradePair, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """`pip install --upgrade idna==3.10`, then a rebuild from the /layers of the old
    tree: the layer holding idna is written again, and at most the top layers beside it."""
    layers = tmp_path / "layers"
    settings = BuildSettings(hash_cache="")
    old = build_into_layers(pip_upgrade_pair.old, settings, layers)
    (layers / "output").rename(layers / "input")
    new = build_into_layers(pip_upgrade_pair.new, settings, layers)
    written = [o.record for o in new.layers if not o.reused]
    idna = next(o.record for o in new.layers if "pip-idna-3.10" in o.record.packages)
    assert idna in written
    assert all(r is idna or r.name in TOP for r in written), [r.name for r in written]
    assert [layer.components for layer in new.plan.layers] == [layer.components for layer in old.plan.layers]
    total = sum(o.record.size for o in new.layers)
    shipped = sum(r.size for r in written)
    with capsys.disabled():
        print(f"\npip upgrade idna 3.7 -> 3.10: {len(written)} of {len(new.layers)} layers written "
              f"({', '.join(r.name for r in written)}), {shipped:,} of {total:,} bytes ({shipped / total:.2%})")


def test_the_daemon_rescans_after_a_pip_install(
    pip_rootfs: Path, tmp_path: Path, daemons: list[DaemonProcess]
) -> None:
    root = tmp_path / "roots" / "pip"
    root.parent.mkdir()
    factory.copy_tree(pip_rootfs, root)
    d = DaemonProcess(tmp_path / "d", [{"name": "pip", "path": str(root), "debounce": 1.0}])
    daemons.append(d)
    d.start()
    d.wait_settled("pip", rescans=0)
    factory._pip_install(root, factory.pip_wheels(), "--break-system-packages", "--upgrade", factory.PIP_UPGRADE)
    after = d.wait_settled("pip", rescans=1)
    written = {layer["name"]: layer["packages"] for layer in after["lastPrebuild"]["layers"] if not layer["reused"]}
    assert any("pip-idna-3.10" in keys for keys in written.values()), json.dumps(written)
    assert all(name in TOP or any(k.startswith("pip-idna-") for k in keys) for name, keys in written.items())
    assert d.stop() == 0
