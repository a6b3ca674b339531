"""Property-based tests of everything pkglayer reads from untrusted places (issue 11):
tar layers and OCI layouts of a source image, history.json, and the plan label. For any
input the reader either succeeds, with a tree inside its root and within the limits, or
fails with a PkglayerError (which the CLI prints as one `pkglayer: error:` line): never
another exception, never a write outside the tree.

Hypothesis draws the inputs from what attackers and broken tools produce: names with
`..`, absolute, long and non-UTF-8 names, every entry type (hard links, symlinks, devices,
whiteouts, opaque directories, sparse and unknown types), numeric fields out of range in
headers and in PAX records, truncated and misaligned streams, and mutated JSON. The runs
are bounded and derandomized; set PKGLAYER_FUZZ_EXAMPLES to explore further.
"""

from __future__ import annotations

import json
import os
import stat
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pkglayer.errors import PkglayerError
from pkglayer.fsutil import remove_tree
from pkglayer.history import ComponentRecord, History, LayerRecord, dumps_history, parse_history
from pkglayer.layout import DEFAULT_LIMITS, HISTORY_LABEL, Descriptor, Limits, image_from_manifest, open_layout
from pkglayer.prior import plan_from_image
from pkglayer.unpack import unpack
from tests import tarcraft
from tests.helpers import sha256_digest

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="unpacking keeps owners and makes devices: needs root")

LIMITS = Limits(image_bytes=1 << 20, entries=300)
# PKGLAYER_FUZZ_EXAMPLES=5000 explores further, with fresh random examples each run.
_EXPLORE = int(os.environ.get("PKGLAYER_FUZZ_EXAMPLES", "0"))
FUZZ = settings(max_examples=_EXPLORE or 150, deadline=None if _EXPLORE else 5000, derandomize=not _EXPLORE,
                database=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# ------------------------------------------------------------------ tar members

COMPONENTS = st.sampled_from([
    "a", "b", "etc", "..", ".", "", ".wh.a", ".wh.etc", ".wh..wh..opq", "x" * 120, "y" * 300,
    "\udcff", "é", "a b", "-", "lnk",
])
# OUTSIDE is replaced by the example's own directory outside the tree.
OUTSIDE = "@OUTSIDE@"


@st.composite
def paths(draw) -> str:
    parts = draw(st.lists(COMPONENTS, min_size=1, max_size=5))
    lead = draw(st.sampled_from(["", "", "", "/", "./", OUTSIDE + "/"]))
    return lead + "/".join(parts)


def fields(width: int):
    top = 256 ** (width - 1) - 1
    return st.one_of(
        st.integers(0, 0o7777),
        st.sampled_from([0, 1, -1, 2**31, 2**32 - 1, 2**32, 2**40, 8 ** (width - 1), top, -top]),
        st.integers(-top, top),
    )


PAX_NUMBERS = st.sampled_from([
    "0", "1", "-1", "-5", "1" * 40, "1" * 5000, "1e999", "nan", "-1.5", "1600000000.123456789", "abc", "",
    str(2**32), str(2**40), "4294967294",
])
PAX_KEYS = st.sampled_from([
    "mtime", "uid", "gid", "size", "atime", "path", "linkpath", "SCHILY.xattr.user.note",
    "SCHILY.xattr.security.capability", "SCHILY.xattr.bogus.ns", "SCHILY.xattr.security.selinux",
    "GNU.sparse.size", "GNU.sparse.map", "GNU.sparse.major", "GNU.sparse.realsize", "hdrcharset",
])
KINDS = st.sampled_from([b"0", b"0", b"5", b"5", b"2", b"1", b"3", b"4", b"6", b"7", b"\0", b"S", b"Z", b"L", b"x"])


@st.composite
def members(draw) -> bytes:
    kind = draw(KINDS)
    name = draw(paths())
    data = draw(st.binary(max_size=600)) if kind in (b"0", b"\0", b"7") else b""
    records = {}
    for key in draw(st.lists(PAX_KEYS, max_size=3, unique=True)):
        if key in ("path", "linkpath"):
            records[key] = draw(paths())
        elif key.startswith("SCHILY.xattr."):
            records[key] = draw(st.binary(max_size=40))
        else:
            records[key] = draw(PAX_NUMBERS)
    return tarcraft.member(
        name.encode("utf-8", "surrogateescape"), kind, data, records or None,
        mode=draw(fields(8)), uid=draw(fields(8)), gid=draw(fields(8)), mtime=draw(fields(12)),
        size=draw(st.one_of(st.just(len(data)), fields(12))),
        linkname=draw(paths()).encode("utf-8", "surrogateescape"),
        devmajor=draw(fields(8)), devminor=draw(fields(8)),
    )


@st.composite
def layers(draw) -> bytes:
    body = b"".join(draw(st.lists(members(), max_size=8)))
    ending = draw(st.sampled_from(["end", "end", "none", "truncate", "garbage"]))
    if ending == "end":
        return body + tarcraft.end()
    if ending == "truncate":
        return body[: draw(st.integers(0, len(body)))]
    if ending == "garbage":
        return body + draw(st.binary(min_size=1, max_size=1024))
    return body


def _snapshot(path: Path) -> dict[str, tuple[int, bytes | str]]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(path):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            st_ = os.lstat(p)
            content = (os.readlink(p) if stat.S_ISLNK(st_.st_mode)
                       else Path(p).read_bytes() if stat.S_ISREG(st_.st_mode) else b"")
            out[os.path.relpath(p, path)] = (st_.st_mode, content)
    return out


def _tree_stats(tree: Path) -> tuple[int, int]:
    entries = size = 0
    for dirpath, dirnames, filenames in os.walk(tree):
        for name in dirnames + filenames:
            entries += 1
            st_ = os.lstat(os.path.join(dirpath, name))
            if stat.S_ISREG(st_.st_mode):
                size += st_.st_size
    return entries, size


@FUZZ
@given(st.lists(layers(), min_size=1, max_size=3))
def test_unpacking_any_layers_stays_inside_and_within_limits_or_fails_cleanly(streams: list[bytes]) -> None:
    base = Path(tempfile.mkdtemp(prefix="pkglayer-fuzz-"))
    try:
        outside = base / "outside"
        outside.mkdir()
        (outside / "canary").write_text("untouched")
        os.symlink("/etc", outside / "etc-link")
        before = _snapshot(outside)
        streams = [s.replace(OUTSIDE.encode(), str(outside).encode()) for s in streams]
        layout = tarcraft.layout(base / "img", streams)
        tree = base / "tree"
        tree.mkdir()
        try:
            unpack(open_layout(str(layout), "t", LIMITS), str(tree), LIMITS)
        except PkglayerError as e:
            assert "\n" not in str(e), "an error is one line"
        else:
            entries, size = _tree_stats(tree)
            assert entries <= LIMITS.entries and size <= LIMITS.image_bytes
        assert _snapshot(outside) == before, "something outside the tree changed"
        assert sorted(os.listdir(base)) == ["img", "outside", "tree"], "something was written beside the tree"
    finally:
        remove_tree(base)


# ------------------------------------------------------------------ JSON documents

JSON_LEAVES = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=20),
    st.sampled_from(["../../x\n", "sha256:" + "0" * 64, "", "\udc80", "a" * 300, "gzip-6", "amd64",
                     "application/vnd.oci.image.layer.v1.tar+gzip", "-1", "unowned"]),
)
JSON_VALUES = st.recursive(JSON_LEAVES, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=8), inner, max_size=3)), max_leaves=6)


def _slots(obj) -> list[tuple]:
    """Every place in a JSON document: (container, key) pairs, found without recursion."""
    out, todo = [], [obj]
    while todo:
        node = todo.pop()
        items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
        for key, value in items:
            out.append((node, key))
            todo.append(value)
    return out


@st.composite
def mutated(draw, doc):
    """`doc` with a few values replaced, keys removed or added."""
    doc = json.loads(json.dumps(doc))
    for _ in range(draw(st.integers(1, 3))):
        slots = _slots(doc)
        if not slots:
            break
        node, key = draw(st.sampled_from(slots))
        action = draw(st.sampled_from(["replace", "replace", "delete", "add"]))
        if action == "replace":
            node[key] = draw(JSON_VALUES)
        elif action == "delete":
            del node[key]
        elif isinstance(node, dict):
            node[draw(st.text(max_size=8))] = draw(JSON_VALUES)
        else:
            node.append(draw(JSON_VALUES))
    return doc


def _digest(draw) -> str:
    return "sha256:" + draw(st.text("0123456789abcdef", min_size=64, max_size=64))


@st.composite
def histories(draw) -> History:
    names = draw(st.lists(st.sampled_from(["unowned", "modified", "pkgdb", "bash-5.2-1-amd64", "libc6-2.36-amd64+3",
                                           "a", "b.c_d~e"]), min_size=1, max_size=4, unique=True))
    layers = tuple(
        LayerRecord(name, tuple(draw(st.lists(st.sampled_from(["bash", "libc6:amd64", "zlib1g"]), max_size=2,
                                              unique=True))),
                    _digest(draw), _digest(draw), _digest(draw), draw(st.integers(0, 2**34)),
                    "application/vnd.oci.image.layer.v1.tar+gzip", "gzip-6")
        for name in names
    )
    components = {"bash": ComponentRecord(("bash",), draw(st.integers(0, 9)), 0)}
    return History(layers, "amd64", "linux", "pkglayer 0.1.0", 1, components)


def _parse_or_error(raw: bytes) -> History | None:
    try:
        return parse_history(raw, "history.json")
    except PkglayerError as e:
        assert "\n" not in str(e)
        return None


@FUZZ
@given(st.data())
def test_history_json_parses_to_a_history_that_round_trips_or_fails_cleanly(data) -> None:
    history = data.draw(histories())
    doc = json.loads(dumps_history(history))
    raw = json.dumps(data.draw(mutated(doc))).encode()
    if data.draw(st.booleans()):  # and bytes no JSON encoder writes
        pos = data.draw(st.integers(0, len(raw)))
        raw = raw[:pos] + data.draw(st.binary(max_size=8)) + raw[pos:]
    parsed = _parse_or_error(raw)
    if parsed is not None:
        assert parse_history(dumps_history(parsed)) == parsed


@FUZZ
@given(st.data())
def test_a_plan_label_gives_a_plan_matching_its_image_or_fails_cleanly(data) -> None:
    history = data.draw(histories())
    descs = [Descriptor(r.media_type, r.digest, r.size) for r in history.layers]
    diff_ids = [r.diff_id for r in history.layers]
    label = json.loads(dumps_history(history))
    if data.draw(st.booleans()):
        label = data.draw(mutated(label))
    value = data.draw(st.one_of(st.just(json.dumps(label)), JSON_VALUES)) if data.draw(st.booleans()) \
        else json.dumps(label)
    config = {"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": diff_ids},
              "config": {"Labels": {HISTORY_LABEL: value}},
              "history": [{"comment": r.name} for r in history.layers]}
    if data.draw(st.booleans()):
        config = data.draw(mutated(config))
    config_raw = json.dumps(config).encode()
    manifest = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                           "digest": sha256_digest(config_raw), "size": len(config_raw)},
                "layers": [{"mediaType": d.media_type, "digest": d.digest, "size": d.size} for d in descs]}
    try:
        # Validated the way every image is (layout.py), then the label read from it.
        image = image_from_manifest("", "sha256:" + "e" * 64, json.dumps(manifest).encode(),
                                    lambda desc: config_raw, DEFAULT_LIMITS, "oci:x:t")
        plan = plan_from_image(image, "oci:x:t")
    except PkglayerError as e:
        assert "\n" not in str(e)
        return
    # Accepted: it agrees with the image it came with, layer by layer.
    assert [(r.digest, r.size, r.media_type, r.diff_id) for r in plan.layers] == \
        [(d.digest, d.size, d.media_type, i) for d, i in zip(descs, diff_ids)]


@FUZZ
@given(st.data())
def test_a_mutated_oci_layout_opens_and_unpacks_or_fails_cleanly(data) -> None:
    base = Path(tempfile.mkdtemp(prefix="pkglayer-fuzz-"))
    try:
        layer = tarcraft.stream([tarcraft.member("etc", b"5", mode=0o755), tarcraft.member("etc/x", data=b"x")])
        layout = tarcraft.layout(base / "img", [layer])
        blobs = layout / "blobs" / "sha256"
        index = json.loads((layout / "index.json").read_text())
        manifest_digest = index["manifests"][0]["digest"]
        manifest = json.loads((blobs / manifest_digest[7:]).read_text())
        config = json.loads((blobs / manifest["config"]["digest"][7:]).read_text())
        which = data.draw(st.sampled_from(["config", "manifest", "index", "all"]))
        if which in ("config", "all"):
            raw = json.dumps(data.draw(mutated(config))).encode()
            digest = sha256_digest(raw)
            (blobs / digest[7:]).write_bytes(raw)
            manifest["config"].update(digest=digest, size=len(raw))
        if which in ("manifest", "config", "all"):
            if which != "config":
                manifest = data.draw(mutated(manifest))
            raw = json.dumps(manifest).encode()
            digest = sha256_digest(raw)
            (blobs / digest[7:]).write_bytes(raw)
            index["manifests"][0].update(digest=digest, size=len(raw))
        if which in ("index", "all"):
            index = data.draw(mutated(index))
        (layout / "index.json").write_text(json.dumps(index))
        tree = base / "tree"
        tree.mkdir()
        try:
            unpack(open_layout(str(layout), data.draw(st.sampled_from(["t", None])), LIMITS), str(tree), LIMITS)
        except PkglayerError as e:
            assert "\n" not in str(e)
        assert sorted(os.listdir(base)) == ["img", "tree"]
    finally:
        remove_tree(base)


def test_a_config_history_that_is_not_an_array_is_ignored_by_the_plan_label_check() -> None:
    """Found by the plan-label property above: `"history": 5` raised a TypeError."""
    label = json.loads(dumps_history(History((), "amd64", "linux", "pkglayer 0.1.0", 1)))
    config = json.dumps({"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": []},
                         "history": 5, "config": {"Labels": {HISTORY_LABEL: json.dumps(label)}}}).encode()
    manifest = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                           "digest": sha256_digest(config), "size": len(config)}, "layers": []}
    image = image_from_manifest("", "sha256:" + "e" * 64, json.dumps(manifest).encode(), lambda d: config,
                                DEFAULT_LIMITS, "oci:x:t")
    assert plan_from_image(image, "oci:x:t").layers == ()
