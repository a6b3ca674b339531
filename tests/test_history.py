"""history.json: roundtrip, canonical form, and every kind of hostile input."""

from __future__ import annotations

import copy
import json
import os

import pytest

from pkglayer.errors import HistoryError
from pkglayer.history import (
    MAX_HISTORY_BYTES,
    ComponentRecord,
    History,
    LayerRecord,
    dumps_history,
    load_history,
    save_history,
)

D1, D2, D3 = ("sha256:" + c * 64 for c in "123")


def layer(name: str = "bash-5.2.15-2+b7-amd64", **kw) -> LayerRecord:
    fields = dict(
        name=name,
        packages=(name,),
        content_key=D1,
        digest=D2,
        diff_id=D3,
        size=1234,
        media_type="application/vnd.oci.image.layer.v1.tar+gzip",
        compression="gzip-6",
    )
    fields.update(kw)
    return LayerRecord(**fields)


HISTORY = History(
    layers=(
        layer(),
        layer("libacl1-2.3.1-3-amd64+4", packages=("libacl1-2.3.1-3-amd64", "libattr1-1:2.5.1-4-amd64")),
        layer("glibc-2.38-1.fc39^20230101git-x86_64", media_type="application/vnd.oci.image.layer.v1.tar+zstd",
              compression="zstd-3"),
        layer("unowned", packages=(), media_type="application/vnd.oci.image.layer.v1.tar", compression="none",
              size=0),
    ),
    architecture="amd64",
    os="linux",
    generator="pkglayer 0.1.0",
    tar_format=1,
)


def good_json() -> dict:
    return json.loads(dumps_history(HISTORY))


def write(tmp_path, obj) -> str:
    path = tmp_path / "history.json"
    path.write_bytes(obj if isinstance(obj, bytes) else json.dumps(obj).encode())
    return str(path)


def test_roundtrip(tmp_path) -> None:
    path = str(tmp_path / "history.json")
    save_history(path, HISTORY)
    assert load_history(path) == HISTORY
    assert os.listdir(tmp_path) == ["history.json"]  # no temp file left
    assert os.stat(path).st_mode & 0o777 == 0o644


def test_canonical_form(tmp_path) -> None:
    text = dumps_history(HISTORY).decode()
    assert text.endswith("}\n") and '\n  "architecture": "amd64",' in text
    obj = json.loads(text)
    assert obj["schemaVersion"] == 1
    assert list(obj) == sorted(obj) and list(obj["layers"][0]) == sorted(obj["layers"][0])
    assert set(obj["layers"][0]) == {
        "name", "packages", "contentKey", "digest", "diffID", "size", "mediaType", "compression", "components",
    }
    assert obj["components"] == {}


def test_planner_state_roundtrips(tmp_path) -> None:
    layer = HISTORY.layers[0]
    history = History(
        layers=(LayerRecord(**{**layer.__dict__, "components": ("bash", "pam_krb5")}),),
        architecture="amd64",
        os="linux",
        generator="pkglayer test",
        tar_format=1,
        components={
            "bash": ComponentRecord(packages=("bash-5.2.15-2-amd64",), builds=3, changes=1),
            # changed in every build: as many changes as builds is valid
            "tzdata": ComponentRecord(packages=("tzdata-2024a-0-all",), builds=4, changes=4),
            "new": ComponentRecord(packages=(), builds=0, changes=0),
        },
    )
    path = str(tmp_path / "history.json")
    save_history(path, history)
    assert load_history(path) == history


def test_history_without_planner_state_loads(tmp_path) -> None:
    obj = good_json()
    obj.pop("components", None)
    for layer in obj["layers"]:
        layer.pop("components", None)
    loaded = load_history(write(tmp_path, obj))
    assert loaded.components == {} and all(layer.components == () for layer in loaded.layers)


@pytest.mark.parametrize(
    "components, message",
    [
        ([], "field 'components' must be an object, not an array"),
        ({"../x": {"packages": [], "builds": 0, "changes": 0}}, "component name '../x' is unsafe"),
        ({"bash": {"packages": [], "builds": 1, "changes": 2}}, "more changes (2) than builds (1)"),
        ({"bash": {"packages": [], "builds": -1, "changes": 0}}, "field 'builds' must be between 0"),
        ({"bash": {"packages": ["a", "a"], "builds": 1, "changes": 0}}, "lists a name more than once"),
        ({"bash": {"builds": 1, "changes": 0}}, "missing field 'packages'"),
        # the whole message: it names the file, the component and the field
        ({"bash": 5}, "{path}: components['bash']: must be a JSON object, not an integer"),
        ({"bash": {"packages": [], "builds": "1", "changes": 0}},
         "{path}: components['bash']: field 'builds' must be an integer, not a string"),
        ({"bash": {"packages": [], "builds": 1, "changes": 2**31}},
         "{path}: components['bash']: field 'changes' must be between 0 and 2147483647, not 2147483648"),
        ({"bash": {"packages": ["../x"], "builds": 1, "changes": 0}},
         "{path}: components['bash']: packages[0] has unsafe value '../x'"),
    ],
)
def test_hostile_planner_state_is_refused(tmp_path, components, message) -> None:
    obj = good_json()
    obj["components"] = components
    path = write(tmp_path, obj)
    with pytest.raises(HistoryError) as e:
        load_history(path)
    if message.startswith("{path}"):
        assert str(e.value) == message.format(path=path)
    else:
        assert message in str(e.value)


def test_planner_counts_up_to_the_limit_load(tmp_path) -> None:
    obj = good_json()
    most = 2**31 - 1
    obj["components"] = {"bash": {"packages": [], "builds": most, "changes": most}}
    assert load_history(write(tmp_path, obj)).components == {
        "bash": ComponentRecord(packages=(), builds=most, changes=most)}


def test_missing_file_is_none(tmp_path) -> None:
    assert load_history(tmp_path / "history.json") is None


def test_unknown_keys_are_ignored(tmp_path) -> None:
    obj = good_json()
    obj["futureField"] = {"anything": [1, 2]}
    obj["layers"][0]["futureLayerField"] = True
    assert load_history(write(tmp_path, obj)) == HISTORY


def test_save_refuses_invalid_history(tmp_path) -> None:
    bad = History(layers=(layer("../etc"),), architecture="amd64", os="linux", generator="g", tar_format=1)
    with pytest.raises(HistoryError) as e:
        save_history(tmp_path / "history.json", bad)
    assert str(e.value) == (f"history to be written to {tmp_path / 'history.json'}: layers[0]: "
                            "field 'name' has unsafe value '../etc'")
    assert os.listdir(tmp_path) == []


def test_symlink_rejected(tmp_path) -> None:
    real = tmp_path / "real.json"
    save_history(real, HISTORY)
    (tmp_path / "history.json").symlink_to(real)
    with pytest.raises(HistoryError, match="symlink"):
        load_history(tmp_path / "history.json")
    (tmp_path / "dangling.json").symlink_to(tmp_path / "absent")
    with pytest.raises(HistoryError, match="symlink"):
        load_history(tmp_path / "dangling.json")


def test_oversized_file_rejected_before_reading(tmp_path) -> None:
    path = tmp_path / "history.json"
    with open(path, "wb") as f:
        f.truncate(65 << 20)  # sparse: 65 MiB that takes no disk
    assert os.stat(path).st_size > MAX_HISTORY_BYTES
    with pytest.raises(HistoryError, match="more than the limit"):
        load_history(path)


@pytest.mark.parametrize("special", ["dir", "fifo"])
def test_not_a_regular_file(tmp_path, special) -> None:
    path = tmp_path / "history.json"
    path.mkdir() if special == "dir" else os.mkfifo(path)
    with pytest.raises(HistoryError, match="not a regular file"):
        load_history(path)


@pytest.mark.parametrize(
    "raw, message",
    [
        (b"", "not valid JSON"),
        (b"{", "not valid JSON"),
        (b"\xff\xfe{}", "not UTF-8"),
        (b"[]", "top level must be a JSON object, not an array"),
        (b'"x"', "top level must be a JSON object, not a string"),
        (b"{}", "missing schemaVersion"),
        (b'{"schemaVersion": 1, "schemaVersion": 1}', "duplicate key 'schemaVersion'"),
        (b'{"size": NaN}', "NaN is not allowed"),
        (b"[" * 100_000 + b"]" * 100_000, "not acceptable JSON"),
        (b'{"x": ' + b"9" * 5000 + b"}", "not acceptable JSON"),
    ],
)
def test_hostile_json(tmp_path, raw, message) -> None:
    with pytest.raises(HistoryError, match=message):
        load_history(write(tmp_path, raw))


@pytest.mark.parametrize(
    "version, message",
    [
        (2, "unsupported schemaVersion 2 (this pkglayer supports schemaVersion 1)"),
        (0, "unsupported schemaVersion 0"),
        ("1", 'unsupported schemaVersion "1"'),
        (1.0, "unsupported schemaVersion 1.0"),
        (True, "unsupported schemaVersion true"),
    ],
)
def test_schema_version(tmp_path, version, message) -> None:
    obj = good_json()
    obj["schemaVersion"] = version
    with pytest.raises(HistoryError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_history(write(tmp_path, obj))


def _set(path: tuple, value):
    def mutate(obj: dict) -> None:
        target = obj
        for key in path[:-1]:
            target = target[key]
        if value is _DELETE:
            del target[path[-1]]
        else:
            target[path[-1]] = value

    return mutate


_DELETE = object()
L0 = ("layers", 0)

HOSTILE = [
    (_set(("architecture",), 5), "field 'architecture' must be a string, not an integer"),
    (_set(("architecture",), "../x"), "field 'architecture' has invalid value"),
    (_set(("os",), _DELETE), "missing field 'os'"),
    (_set(("generator",), "a\nb"), "field 'generator' must be printable"),
    (_set(("tarFormat",), "1"), "field 'tarFormat' must be an integer, not a string"),
    (_set(("tarFormat",), 0), "field 'tarFormat' must be a positive integer"),
    (_set(("layers",), {}), "field 'layers' must be an array, not an object"),
    (_set(("layers", 0), "bash"), r"layers\[0\]: must be a JSON object, not a string"),
    (_set(L0 + ("name",), None), r"layers\[0\]: field 'name' must be a string, not null"),
    (_set(L0 + ("name",), ""), "field 'name' has unsafe value ''"),
    (_set(L0 + ("name",), "a/b"), "unsafe value 'a/b'"),
    (_set(L0 + ("name",), ".."), r"unsafe value '\.\.'"),
    (_set(L0 + ("name",), "a\x00b"), "unsafe value"),
    (_set(L0 + ("name",), "-rf"), "unsafe value"),
    (_set(L0 + ("name",), "a" * 256), "unsafe value"),
    (_set(L0 + ("name",), "bash\n"), "unsafe value"),
    (_set(L0 + ("packages",), "bash"), r"\(bash-5.2.15-2\+b7-amd64\): field 'packages' must be an array"),
    (_set(L0 + ("packages",), [1]), r"packages\[0\] must be a string, not an integer"),
    (_set(L0 + ("packages",), ["../../x"]), r"packages\[0\] has unsafe value"),
    (_set(L0 + ("packages",), ["a", "a"]), "field .packages. lists a name more than once"),
    (_set(L0 + ("digest",), "sha256:" + "A" * 64), "field 'digest' must be sha256:<64 lower-case hex>"),
    (_set(L0 + ("digest",), "sha256:" + "a" * 64 + "\n"), "field 'digest' must be sha256"),
    (_set(L0 + ("diffID",), "sha512:" + "a" * 64), "field 'diffID' must be sha256"),
    (_set(L0 + ("contentKey",), "sha256:../../etc/passwd"), "field 'contentKey' must be sha256"),
    (_set(L0 + ("digest",), _DELETE), "missing field 'digest'"),
    (_set(L0 + ("size",), -1), "field 'size' must not be negative, not -1"),
    (_set(L0 + ("size",), 1.5), "field 'size' must be an integer, not a number"),
    (_set(L0 + ("size",), True), "field 'size' must be an integer, not a boolean"),
    (_set(L0 + ("size",), 2**63), "int64"),
    (_set(L0 + ("mediaType",), "application/vnd.docker.image.rootfs.diff.tar.gzip"), "unknown mediaType"),
    (_set(L0 + ("compression",), "brotli-5"), "unknown compression 'brotli-5'"),
    (_set(L0 + ("compression",), "zstd-3"), "compression 'zstd-3' does not match mediaType"),
    (_set(("layers", 1, "name"), "bash-5.2.15-2+b7-amd64"), r"layers\[1\]: duplicate layer name"),
]


@pytest.mark.parametrize("mutate, message", HOSTILE, ids=[m for _, m in HOSTILE])
def test_hostile_fields(tmp_path, mutate, message) -> None:
    obj = copy.deepcopy(good_json())
    mutate(obj)
    with pytest.raises(HistoryError, match=message) as info:
        load_history(write(tmp_path, obj))
    assert "\n" not in str(info.value)  # one line, even for hostile values
    assert str(info.value).startswith(str(tmp_path / "history.json") + ": ")


def test_a_platform_variant_roundtrips_and_is_left_out_when_there_is_none(tmp_path) -> None:
    arm = History(layers=HISTORY.layers, architecture="arm64", os="linux", generator="pkglayer test",
                  tar_format=1, variant="v8")
    path = str(tmp_path / "history.json")
    save_history(path, arm)
    assert load_history(path) == arm and json.loads(open(path).read())["variant"] == "v8"
    assert "variant" not in good_json()  # amd64 histories stay byte for byte what they were


@pytest.mark.parametrize("value, message", [
    (8, "field 'variant' must be a string, not an integer"),
    ("", "field 'variant' has invalid value"),
    ("v8/../x", "field 'variant' has invalid value"),
])
def test_a_hostile_variant_is_refused(tmp_path, value, message) -> None:
    obj = good_json()
    obj["variant"] = value
    with pytest.raises(HistoryError, match=message):
        load_history(write(tmp_path, obj))
