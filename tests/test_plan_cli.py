"""The planner on real trees: components from real databases and changelogs, plans kept
stable across real upgrades, additions and removals, and `pkglayer plan` / `diff`."""

from __future__ import annotations

import gzip
import json
import re
import subprocess
import textwrap
from email.utils import parsedate_to_datetime
from pathlib import Path

from debian.changelog import Changelog

from pkglayer.rootfs import Rootfs
from pkglayer.sources import dpkg, open_source
from pkglayer.sources.base import CHANGELOG_SPAN
from tests.helpers import TOP_LAYERS, build_json, layout_manifest, pkglayer, pkglayer_json, promote_outputs
from tests.rootfs_factory import RPM_DBPATH, build_rpm, copy_tree


def _plan_json(rootfs: Path, *args: str) -> dict:
    return pkglayer_json("plan", rootfs, *args)


def _membership(result: dict) -> dict[str, tuple[str, ...]]:
    """package name -> the names of every package in its layer (versions left out)."""
    out = {}
    for layer in result["layers"]:
        names = tuple(sorted(k.split("-")[0] for k in layer["packages"]))
        for k in layer["packages"]:
            out[k] = names
    return out


def test_changelog_times_come_from_the_debian_changelogs(deb_rootfs: Path) -> None:
    with Rootfs(str(deb_rootfs)) as rootfs:
        packages = {p.name: p for p in open_source(rootfs, None).packages()}
    libc = packages["libc6"]
    text = gzip.decompress((deb_rootfs / "usr/share/doc/libc6/changelog.Debian.gz").read_bytes()).decode()
    trailers = re.findall(r"^ -- .*>  (.*)$", text, flags=re.M)
    every = sorted({int(parsedate_to_datetime(t).timestamp()) for t in trailers}, reverse=True)
    # the newest entries, at least all within CHANGELOG_SPAN of the newest one
    recent = [t for t in every if t > every[0] - CHANGELOG_SPAN]
    assert list(libc.changelog) == every[: len(libc.changelog)]
    assert len(libc.changelog) >= len(recent) and len(libc.changelog) > 5
    # native packages keep theirs in changelog.gz
    assert packages["dpkg"].changelog and packages["apt"].changelog


def test_entry_times_agree_with_python_debians_full_parse(deb_rootfs: Path) -> None:
    """dpkg.py reads only the changelogs' trailer lines; python-debian parses every
    line. Both find the same entries, in order, in every Debian changelog of a real tree;
    where python-debian stops (at an old-format section: dpkg's own changelog has one),
    the trailer lines go on with older entries only."""
    compared = entries = longer = 0
    for doc in sorted((deb_rootfs / "usr/share/doc").iterdir()):
        debian = sorted(doc.glob("changelog.Debian*.gz"))  # binNMU entries: changelog.Debian.ARCH.gz
        for path in debian or [doc / "changelog.gz"]:  # native packages: changelog.gz
            if not path.is_file() or path.is_symlink():
                continue
            text = gzip.decompress(path.read_bytes())
            blocks = Changelog(text.decode("utf-8", "replace"), strict=False)
            expected = [int(parsedate_to_datetime(b.date).timestamp()) for b in blocks if b.date]
            got = dpkg._entry_times(text, len(expected) + 1000)
            assert got[: len(expected)] == expected, path
            assert all(t < min(expected) for t in got[len(expected):]), path
            assert dpkg._entry_times(text, 3) == expected[:3], path
            compared += 1
            entries += len(expected)
            longer += len(got) > len(expected)
    assert compared > 50 and entries > 1000 and longer >= 1


def test_plan_groups_by_source_and_stays_in_budget(deb_rootfs: Path) -> None:
    plan = _plan_json(deb_rootfs)
    assert len(plan["layers"]) <= plan["budget"] == 64
    scan = pkglayer_json("scan", deb_rootfs)
    placed = [k for layer in plan["layers"] for k in layer["packages"]]
    with_files = sorted(p["key"] for p in scan["packages"] if p["files"])
    assert sorted(placed) == with_files
    layer_of = {k: layer["name"] for layer in plan["layers"] for k in layer["packages"]}
    util_linux = [p["key"] for p in scan["packages"] if p["source"] == "util-linux" and p["files"]]
    assert len(util_linux) > 2 and len({layer_of[k] for k in util_linux}) == 1
    # the estimates come from changelogs: some components changed in the last year, most did not
    rates = [c for layer in plan["layers"] for c in layer["components"] if c["name"] not in TOP_LAYERS]
    busy = [c for c in rates if not c["evidence"].startswith("changelog in 0/")]
    assert 0 < len(busy) < len(rates) / 2
    assert all(c["weekly"] > min(r["weekly"] for r in rates) for c in busy)
    assert plan["lowerBound"] <= plan["expectedBytes"] <= plan["singleLayer"]
    assert plan["decision"] == "fresh plan (no prior plan)"
    # a smaller budget costs more per update, never less
    tight = _plan_json(deb_rootfs, "--max-layers", "8")
    assert len(tight["layers"]) <= 8 and tight["expectedBytes"] >= plan["expectedBytes"]


def test_plan_text_output_explains_each_layer(deb_rootfs: Path) -> None:
    out = pkglayer("plan", str(deb_rootfs), "--max-layers", "16").stdout
    lines = out.splitlines()
    assert lines[0].split()[:6] == ["#", "layer", "size", "p/week", "bytes/update", "members"]
    assert any(line.split()[1] == "pkgdb" for line in lines[1:])
    assert re.search(r"of 16 layers; expected download per update .*x one layer per component", out)


def test_rpm_changelog_and_source_rpm_make_one_component(rpm_rootfs: Path, tmp_path: Path) -> None:
    spec = tmp_path / "pkglayer-multi.spec"
    spec.write_text(textwrap.dedent("""\
        Name: pkglayer-multi
        Version: %{pkg_version}
        Release: %{pkg_release}
        Summary: two binary packages from one source
        License: MIT
        BuildArch: noarch
        %description
        main
        %package -n pkglayer-multi-data
        Summary: data
        %description -n pkglayer-multi-data
        data
        %install
        mkdir -p %{buildroot}/usr/share/multi
        echo main > %{buildroot}/usr/share/multi/main
        echo data > %{buildroot}/usr/share/multi/data
        %files
        /usr/share/multi/main
        %files -n pkglayer-multi-data
        /usr/share/multi/data
        %changelog
        * Wed Jul 01 2026 t <t@pkglayer.invalid> - 1.0-3
        - third
        * Mon Jun 01 2026 t <t@pkglayer.invalid> - 1.0-2
        - second
        * Thu Jan 01 2026 t <t@pkglayer.invalid> - 1.0-1
        - first
        """))
    build_rpm(spec, "1.0", "3", tmp_path / "rpms")
    rpms = sorted((tmp_path / "rpms").rglob("*.rpm"))
    assert len(rpms) == 2
    root = tmp_path / "root"
    copy_tree(rpm_rootfs, root)
    subprocess.run(
        ["rpm", "--root", root, "--dbpath", RPM_DBPATH, "-i", "--nodeps", "--noscripts", "--force-debian", *rpms],
        check=True, capture_output=True,
    )
    with Rootfs(str(root)) as rootfs:
        packages = {p.name: p for p in open_source(rootfs, None).packages()}
    want = subprocess.run(
        ["rpm", "-qp", "--qf", "[%{CHANGELOGTIME}\n]", rpms[0]], check=True, capture_output=True, text=True
    ).stdout.split()
    assert packages["pkglayer-multi"].changelog == tuple(sorted(map(int, want), reverse=True))
    assert len(want) == 3
    assert packages["pkglayer-multi-data"].source == packages["pkglayer-multi"].source == "pkglayer-multi"
    plan = _plan_json(root)
    (layer,) = [x for x in plan["layers"] if any(k.startswith("pkglayer-multi-") for k in x["packages"])]
    assert {k.rsplit("-", 3)[0] for k in layer["packages"]} >= {"pkglayer-multi", "pkglayer-multi-data"}
    (component,) = [c for c in layer["components"] if c["name"] == "pkglayer-multi"]
    assert component["evidence"].startswith("changelog in 3/52 weeks")


def test_upgrade_keeps_every_package_in_its_layer(deb_upgrade_pair, tmp_path: Path) -> None:
    layers = tmp_path / "layers"
    first = build_json(deb_upgrade_pair.old, "--layers", str(layers))
    promote_outputs(layers)
    second = build_json(deb_upgrade_pair.new, "--layers", str(layers))
    assert len(first["layers"]) == len(second["layers"])
    by_name = lambda r: {k.split("-")[0]: v for k, v in _membership(r).items()}  # noqa: E731
    assert by_name(first) == by_name(second)
    changed = {layer["name"] for layer in second["layers"] if not layer["reused"]} - TOP_LAYERS
    upgraded = set(deb_upgrade_pair.upgraded)
    for layer in second["layers"]:
        holds_upgrade = any(k.rsplit("-", 2)[0].startswith(tuple(upgraded)) for k in layer["packages"])
        assert (layer["name"] in changed) == holds_upgrade or layer["name"] in TOP_LAYERS
    # the planner remembers what it saw: one more build of each component, and a change
    # for the upgraded ones
    history = json.loads((layers / "history.json").read_text())
    stats = history["components"]
    assert all(s["builds"] == 1 for s in stats.values())
    changed_components = {n for n, s in stats.items() if s["changes"]}
    assert changed_components and len(changed_components) <= len(upgraded)
    assert all(layer["components"] for layer in history["layers"] if layer["name"] not in TOP_LAYERS)


def test_adding_and_removing_packages_moves_nothing_else(deb_upgrade_pair, deb_rootfs: Path, tmp_path: Path) -> None:
    # deb_rootfs is the pair's old tree plus iputils-ping and libcap2-bin
    layers = tmp_path / "layers"
    base = build_json(deb_upgrade_pair.old, "--layers", str(layers))
    promote_outputs(layers)
    plan = _plan_json(deb_rootfs, "--prior", str(layers / "history.json"))
    assert plan["decision"].startswith("kept the prior plan: 1 added, 0 removed"), plan["decision"]
    moves = {m["component"]: m["why"] for layer in plan["layers"] for m in layer["moved"]}
    assert moves == {"iputils": "new: own layer (a slot was free)"}
    added = build_json(deb_rootfs, "--layers", str(layers))
    before, after = _membership(base), _membership(added)
    new_keys = set(after) - set(before)
    assert any(k.startswith("iputils-ping-") for k in new_keys)
    untouched = [layer for layer in base["layers"] if not set(layer["packages"]) & {k for k in new_keys}]
    for layer in base["layers"]:
        if layer["name"] in TOP_LAYERS:
            continue
        same = next((x for x in added["layers"] if x["digest"] == layer["digest"]), None)
        holds_new_company = any(after.get(k) != before[k] for k in layer["packages"])
        assert (same is not None) != holds_new_company, layer["name"]
    assert untouched

    # now remove it again: the layers keep their members, minus the removed ones
    promote_outputs(layers)
    root = tmp_path / "root"
    copy_tree(deb_rootfs, root)
    subprocess.run(["dpkg", f"--root={root}", "--purge", "iputils-ping"], check=True, capture_output=True)
    removed = build_json(root, "--layers", str(layers))
    kept = {layer["digest"] for layer in removed["layers"]}
    lost = [layer for layer in added["layers"] if layer["digest"] not in kept and layer["name"] not in TOP_LAYERS]
    assert [k for layer in lost for k in layer["packages"] if not k.startswith("iputils-ping-")] == []


def test_diff_shows_changed_layers_their_packages_and_the_download(deb_upgrade_pair, tmp_path: Path) -> None:
    old, new = tmp_path / "old", tmp_path / "new"
    build_json(deb_upgrade_pair.old, "--layers", str(old), "--output", f"oci:{tmp_path}/img:old")
    copy_tree(old, new)
    promote_outputs(new)
    second = build_json(deb_upgrade_pair.new, "--layers", str(new), "--output", f"oci:{tmp_path}/img:new")
    written = [layer for layer in second["layers"] if not layer["reused"]]

    for a, b in ((old, new), (f"oci:{tmp_path}/img:old", f"oci:{tmp_path}/img:new")):
        diff = pkglayer_json("diff", a, b)
        assert diff["download"] == sum(layer["size"] for layer in written)
        assert diff["total"] == sum(layer["size"] for layer in second["layers"])
        changed = [c for c in diff["layers"] if c["status"] != "unchanged"]
        assert {c["name"] for c in changed} == {layer["name"] for layer in written}
        for name in deb_upgrade_pair.upgraded:
            (c,) = [c for c in changed if any(k.startswith(f"{name}-") for k in c["added"])]
            assert any(k.startswith(f"{name}-") for k in c["removed"]) and c["status"] == "changed"
    text = pkglayer("diff", str(old), str(new)).stdout
    assert "a client with the old image downloads" in text and "\n" + " " * 23 + "+ " in text


def test_diff_of_something_that_is_not_a_build_is_a_clear_error(tmp_path: Path) -> None:
    r = pkglayer("diff", str(tmp_path / "nope"), str(tmp_path / "nope2"), check=False)
    assert r.returncode == 1 and "no such history.json" in r.stderr
    r = pkglayer("diff", f"oci:{tmp_path}/none:t", str(tmp_path), check=False)
    assert r.returncode == 1 and "no image written by pkglayer" in r.stderr


def test_observations_carry_over_through_the_image_label(deb_upgrade_pair, tmp_path: Path) -> None:
    """Building over the earlier image of the same tag (no history.json anywhere): the
    planner's observations come back from the image's plan label."""
    layout = tmp_path / "img"
    build_json(deb_upgrade_pair.old, "--output", f"oci:{layout}:t")
    build_json(deb_upgrade_pair.new, "--output", f"oci:{layout}:t")
    _, _, config = layout_manifest(layout, "t")
    stats = json.loads(config["config"]["Labels"]["org.pkglayer.history"])["components"]
    assert stats and all(s["builds"] == 1 for s in stats.values())
    changed = {n for n, s in stats.items() if s["changes"]}
    assert changed == {"xz-utils"} == {n for n in stats if any(k.startswith("liblzma5-") for k in stats[n]["packages"])}
