"""The build system's half of the /layers protocol (podman #12530), for any producer.

Before the build, `init` fills DIR from the previous image of the tag: its layer blobs
in DIR/input/blobs/sha256, and DIR/history.json naming them (the image's plan label;
for an image pkglayer did not write, one entry per layer named after its config
history). The producer inside the build reads those, writes the blobs it makes to
DIR/output/blobs/sha256 and a new DIR/history.json. After the build, `assemble` makes
the image from that history: every blob named is checked against its digest, size and
diff_id before anything is written.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import os
import re
import zlib
from dataclasses import dataclass

from . import __version__
from .blobstore import BlobDir
from .errors import HistoryError, PkglayerError
from .fsutil import Workspace, remove_tree
from .history import NAME_RE, History, LayerRecord, load_history, save_history
from .layout import DEFAULT_LIMITS, Image, Limits, Platform, open_layout
from .mediatypes import LAYER_COMPRESSION, LAYER_MEDIA_TYPES
from .prior import plan_from_image
from .tarwriter import TAR_FORMAT
from .transports import STORAGE, ImageRef, check_readable, fetch

log = logging.getLogger(__name__)

_CHUNK = 1 << 20
# What skopeo says, transport by transport, when the image is not there at all.
_MISSING = re.compile(
    r"manifest unknown|name unknown|not found|does not exist|does not resolve to an image|no image tagged|"
    r"no such image|identifier is not an image",
    re.IGNORECASE,
)


@dataclass
class InitReport:
    image: str | None  # the image read; None for a first build (no image yet)
    layers: int = 0
    from_plan_label: bool = False  # the history came from pkglayer's label, not config history
    blobs: int = 0  # of those layers, the blobs put in input/

    def as_json(self) -> dict:
        return {"image": self.image, "layers": self.layers, "blobs": self.blobs, "fromPlanLabel": self.from_plan_label}


def init(directory: str, ref: ImageRef, work: Workspace, opts=None, limits: Limits = DEFAULT_LIMITS) -> InitReport:
    """Fill DIR/input and DIR/history.json from the image `ref` (see the module docstring).
    A new build starts here: the blobs the previous one left in DIR/output are in that
    image now, so output/ is emptied."""
    output = os.path.join(directory, "output")
    if os.path.isdir(output):
        log.info("%s: emptied (its blobs belong to the previous build)", output)
        remove_tree(output)
    input_blobs = BlobDir(os.path.join(directory, "input"), create=True)
    storage = ref.transport == STORAGE
    try:
        check_readable(ref, "--from")
        layout, tag = fetch(ref, work, "previous", opts, decompress=storage, what="--from")
        image = open_layout(layout, tag, limits)
    except PkglayerError as e:
        if not _MISSING.search(str(e)):
            raise
        log.info("no previous image %s: a first build (empty input/, no history)", ref)
        return InitReport(None)
    try:
        history, labelled = plan_from_image(image, ref.text, blobs_as_labelled=not storage), True
    except PkglayerError:
        history, labelled = history_from_config(image), False
    private = not ref.is_layout  # fetched into the workspace: ours to link from
    source = BlobDir(layout)
    present = 0
    for rec in history.layers:
        if not source.has(rec.digest):
            # Local storage gives back compressed layers only as new blobs: the plan
            # keeps the layer, and the producer writes it again (to the same digest).
            continue
        if private:
            input_blobs.import_blob(source, rec.digest)
        else:
            # Never a hard link to a published layout's blob: a later write to input/
            # (by whoever the build runs as) would change it under its digest.
            input_blobs.copy_blob(source, rec.digest)
        present += 1
    if present < len(history.layers):
        log.info("%s: %d of %d layer blobs could be taken into input/ (local storage keeps layers "
                 "uncompressed: build with --compression none to reuse all of them)", ref, present,
                 len(history.layers))
    save_history(os.path.join(directory, "history.json"), history)
    return InitReport(ref.text, len(history.layers), labelled, present)


def history_from_config(image: Image) -> History:
    """A history for an image pkglayer did not write: one entry per layer, named after
    the config's history (created_by) so that a producer can match its own steps.
    Content keys are the diff_ids (content known only as the tar's digest), and the
    compression is the bare format: its level is unknown."""
    entries = [h for h in image.config.get("history") or [] if isinstance(h, dict) and not h.get("empty_layer")]
    described = len(entries) == len(image.layers)
    layers = []
    for i, (desc, diff_id) in enumerate(zip(image.layers, image.diff_ids)):
        text = str(entries[i].get("created_by") or "") if described else ""
        compression = LAYER_COMPRESSION[desc.media_type]
        media_type = LAYER_MEDIA_TYPES[compression]  # a Docker type, as its OCI equal
        layers.append(LayerRecord(
            name=_layer_name(i, text), packages=(), content_key=diff_id, digest=desc.digest, diff_id=diff_id,
            size=desc.size, media_type=media_type, compression=compression,
        ))
    generator = f"pkglayer {__version__} (from {image.manifest_digest})"
    return History(tuple(layers), image.architecture, image.os, generator, TAR_FORMAT, variant=image.variant or "")


def _layer_name(index: int, created_by: str) -> str:
    """`003-RUN-apt-get-install-...`: the index keeps names unique, the words help."""
    words = re.sub(r"[^A-Za-z0-9._+~@^-]+", "-", created_by.replace("/bin/sh -c ", "")).strip("-.")
    name = f"{index:03d}-{words}"[:120].rstrip("-.") if words else f"{index:03d}"
    assert NAME_RE.fullmatch(name)
    return name


@dataclass(frozen=True)
class Assembled:
    history: History
    platform: Platform
    blob_sources: tuple[BlobDir, ...]


def assemble(directory: str, limits: Limits = DEFAULT_LIMITS) -> Assembled:
    """The image DIR/history.json describes, its blobs found in DIR/output or DIR/input
    and each checked (size, digest, then the diff_id of its uncompressed stream), before
    anything is written."""
    history = load_history(os.path.join(directory, "history.json"))
    if history is None:
        raise HistoryError(f"{directory}/history.json does not exist: nothing to assemble")
    if not history.layers:
        raise HistoryError(f"{directory}/history.json lists no layers")
    sources = tuple(BlobDir(os.path.join(directory, sub)) for sub in ("output", "input")
                    if os.path.isdir(os.path.join(directory, sub)))
    for rec in history.layers:
        src = next((d for d in sources if d.has(rec.digest)), None)
        if src is None:
            raise PkglayerError(f"layer {rec.name}: blob {rec.digest} is in neither {directory}/output "
                                f"nor {directory}/input")
        _check_layer_blob(src, rec, limits)
    return Assembled(history, Platform(history.architecture, history.os, history.variant or None), sources)


def _check_layer_blob(blobs: BlobDir, rec: LayerRecord, limits: Limits) -> None:
    where = f"layer {rec.name}: blob {rec.digest}"
    fd = os.open(blobs.path(rec.digest), os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as f:
        size = os.fstat(fd).st_size
        if size != rec.size:
            raise PkglayerError(f"{where} is {size} bytes, history.json says {rec.size}")
        digest, plain = hashlib.sha256(), hashlib.sha256()
        compression = LAYER_COMPRESSION[rec.media_type]
        inflate = _inflater(compression)
        total = 0
        try:
            while chunk := f.read(_CHUNK):
                digest.update(chunk)
                out = inflate(chunk)
                total += len(out)
                if total > limits.image_bytes:
                    raise PkglayerError(f"{where}: more than {limits.image_bytes} bytes uncompressed")
                plain.update(out)
        except (zlib.error, EOFError, gzip.BadGzipFile, OSError) as e:
            raise PkglayerError(f"{where}: not a valid {compression} stream: {e}") from None
        except Exception as e:
            if type(e).__name__ == "ZstdError":
                raise PkglayerError(f"{where}: not a valid zstd stream: {e}") from None
            raise
    if "sha256:" + digest.hexdigest() != rec.digest:
        raise PkglayerError(f"{where} does not match its digest: the content has sha256:{digest.hexdigest()}")
    if "sha256:" + plain.hexdigest() != rec.diff_id:
        raise PkglayerError(f"{where}: uncompressed, it has digest sha256:{plain.hexdigest()}, "
                            f"history.json's diffID is {rec.diff_id}")


def _inflater(compression: str):
    """A function from compressed chunks to uncompressed bytes, reading through every
    gzip member and zstd frame (pkglayer writes several of each)."""
    if compression == "none":
        return lambda chunk: chunk
    if compression == "gzip":
        return _members(lambda: zlib.decompressobj(31))
    import zstandard

    return _members(lambda: zstandard.ZstdDecompressor().decompressobj())


def _members(new):
    """Chunks in, bytes out, for a stream of independent members that `new()` makes one
    decompressor each for (what one leaves unused starts the next)."""
    state = {"d": new()}

    def inflate(chunk: bytes) -> bytes:
        out = []
        data = chunk
        while data:
            d = state["d"]
            out.append(d.decompress(data))
            if d.eof:
                data = d.unused_data
                state["d"] = new()
            else:
                data = b""
        return b"".join(out)

    return inflate
