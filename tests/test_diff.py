"""What a client downloads between two builds (pkglayer.diff), on layer records made by
hand: which layers are unchanged, changed (and matched to which old layer), new or gone."""

from __future__ import annotations

from pathlib import Path

import pytest

from pkglayer.diff import diff_layers, load_layers
from pkglayer.errors import PkglayerError
from pkglayer.history import History, LayerRecord, save_history


def rec(name: str, digest: str, size: int, packages: tuple[str, ...] = (), components: tuple[str, ...] = ()
        ) -> LayerRecord:
    return LayerRecord(name=name, packages=packages, content_key="sha256:" + "c" * 64,
                       digest="sha256:" + digest * 64, diff_id="sha256:" + "d" * 64, size=size,
                       media_type="application/vnd.oci.image.layer.v1.tar+gzip", compression="gzip-6",
                       components=components)


OLD = (
    rec("base-files-1", "1", 100, ("base-files-1",), ("base-files",)),
    rec("libc6-2.36-1+1", "2", 5000, ("libc6-2.36-1", "libc-bin-2.36-1"), ("glibc",)),
    rec("bash-5.2-1", "3", 800, ("bash-5.2-1",), ("bash",)),
    rec("gone-1", "4", 60, ("gone-1",), ("gone",)),
    rec("pkgdb", "5", 300),
)
NEW = (
    rec("base-files-1", "1", 100, ("base-files-1",), ("base-files",)),  # same blob
    rec("libc6-2.36-2+1", "6", 5100, ("libc6-2.36-2", "libc-bin-2.36-2"), ("glibc",)),  # upgraded
    rec("bash-5.2-1+1", "7", 900, ("bash-5.2-1", "readline-8.2-1"), ("bash", "readline")),  # joined
    rec("fresh-1", "8", 70, ("fresh-1",), ("fresh",)),  # nothing in common with an old layer
    rec("pkgdb", "9", 310),
)


def test_each_layer_is_unchanged_changed_new_or_removed() -> None:
    diff = diff_layers(OLD, NEW)
    by_name = {(c.name, c.status): c for c in diff.layers}
    assert [(c.name, c.status) for c in diff.layers] == [
        ("base-files-1", "unchanged"), ("libc6-2.36-2+1", "changed"), ("bash-5.2-1+1", "changed"),
        ("fresh-1", "new"), ("pkgdb", "changed"), ("gone-1", "removed"),
    ]
    unchanged = by_name["base-files-1", "unchanged"]
    assert (unchanged.download, unchanged.was) == (0, "base-files-1")
    libc = by_name["libc6-2.36-2+1", "changed"]
    assert (libc.download, libc.was) == (5100, "libc6-2.36-1+1")
    assert libc.added == ("libc-bin-2.36-2", "libc6-2.36-2") and libc.removed == ("libc-bin-2.36-1", "libc6-2.36-1")
    bash = by_name["bash-5.2-1+1", "changed"]
    assert (bash.was, bash.added, bash.removed) == ("bash-5.2-1", ("readline-8.2-1",), ())
    fresh = by_name["fresh-1", "new"]
    assert (fresh.download, fresh.was, fresh.added) == (70, None, ("fresh-1",))
    pkgdb = by_name["pkgdb", "changed"]  # no packages: matched by name
    assert (pkgdb.was, pkgdb.download) == ("pkgdb", 310)
    gone = by_name["gone-1", "removed"]
    assert (gone.download, gone.removed) == (0, ("gone-1",))
    assert diff.download == 5100 + 900 + 70 + 310
    assert diff.total == 100 + 5100 + 900 + 70 + 310  # the removed layer is not in the new image


def test_a_changed_layer_is_matched_to_the_old_layer_it_shares_most_with() -> None:
    old = (rec("a", "1", 1, components=("x", "y")), rec("b", "2", 1, components=("y", "z", "w")))
    new = (rec("n", "3", 7, components=("x", "y", "z", "w")),)
    (change, removed) = diff_layers(old, new).layers
    assert (change.status, change.was) == ("changed", "b")  # shares three with b, two with a
    assert (removed.name, removed.status) == ("a", "removed")
    # equal overlap: the name decides, so the result does not depend on the order
    tie = (rec("m", "4", 7, components=("x", "z")),)
    assert diff_layers(old, tie).layers[0].was == diff_layers(old[::-1], tie).layers[0].was == "b"


def test_identical_builds_download_nothing() -> None:
    diff = diff_layers(OLD, OLD)
    assert {c.status for c in diff.layers} == {"unchanged"} and diff.download == 0
    assert diff.total == sum(r.size for r in OLD)


def test_layers_are_loaded_from_a_history_or_its_directory(tmp_path: Path) -> None:
    history = History(layers=OLD, architecture="amd64", os="linux", generator="test", tar_format=1)
    save_history(str(tmp_path / "history.json"), history)
    assert load_layers(str(tmp_path)) == load_layers(str(tmp_path / "history.json")) == OLD
    with pytest.raises(PkglayerError, match="no such history.json"):
        load_layers(str(tmp_path / "nowhere"))
    with pytest.raises(PkglayerError, match="no image written by pkglayer"):
        load_layers(f"oci:{tmp_path}/no-layout:t")


def test_a_blob_still_in_the_new_image_is_not_removed() -> None:
    # two old layers with one blob (two empty layers, say): the new image keeps the blob
    old = (rec("first", "1", 32, ("p-1",)), rec("second", "1", 32, ("q-1",)))
    diff = diff_layers(old, (rec("renamed", "1", 32, ("p-1",)),))
    assert [(c.name, c.status, c.was) for c in diff.layers] == [("renamed", "unchanged", "first")]
    assert diff.download == 0
