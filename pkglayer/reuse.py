"""Which earlier blob, if any, a planned layer can reuse instead of being written.

In this order:
1. the daemon's layer cache, by content key: its blobs need no re-hashing, only the
   cache's owner writes them;
2. a prior layer with the same content key, whose blob is present and verified in one of
   the prior's blob directories (or the output's), or is known to be in the destination
   registry;
3. for a package whose files were edited since installation, a prior layer of exactly
   its packages that is the pristine form of it, read through and checked member by
   member (pristine.py).

A prior blob is reusable only when it was made with the same compression format and media
type: the content key names the uncompressed tar, the format what a client must be able
to read. Its level (or library) may differ from the build's: those only decide how new
blobs are written, and rewriting an unchanged layer to change them would make every
client download it again. The daemon's layer cache, which no client sees, is keyed by the
whole spec.

history.json (and a plan label) is trusted to pair a content key with a blob: a blob is
checked against its digest and size, not against the key. With `verify` (--verify-reused)
a blob reused by key is also read through once, and reused only if the layer it holds
has that content key and diff_id; the result is remembered in the digest cache for as
long as the blob file's inode, size, mtime and ctime stay the same (docs/security.md),
as is a blob's sha256: an unchanged blob file is not read again.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, replace

from .blobstore import BlobDir
from .compress import spec_format
from .errors import PkglayerError
from .hashcache import TreeRecords
from .history import LayerRecord
from .ownership import Ownership
from .plan import PlannedLayer
from .prior import Prior
from .tarwriter import layer_members

# The digest-cache "algorithm" under which a blob's checked identity is remembered.
_IDENTITY = "layer-identity-v1"

log = logging.getLogger(__name__)


class MustRead(Exception):
    """find(read=False) cannot answer without reading a blob (hashing it, looking inside)."""


@dataclass(frozen=True)
class Reuse:
    record: LayerRecord  # the earlier layer, renamed after the planned one
    cached: bool = False  # from the layer cache


class ReuseIndex:
    def __init__(
        self, prior: Prior, compression: str, media_type: str, output: BlobDir, ownership: Ownership, dir_mtime: int,
        with_root: bool = False, verify: bool = False, records: TreeRecords | None = None,
    ):
        self.prior = prior
        self.verify = verify
        # What earlier builds found about blob files that are still unchanged (stamps):
        # their sha256, and with `verify` the layer they hold.
        self.records = records or TreeRecords(None)
        self.compression = compression
        self.media_type = media_type
        self.output = output
        self.ownership = ownership
        self.dir_mtime = dir_mtime
        self.with_root = with_root
        self.sources = (*prior.blob_sources, output)
        self._looked_up: dict[str, LayerRecord] = {}  # by layer name: see cached()
        self.by_key: dict[str, LayerRecord] = {}
        self.by_packages: dict[tuple[str, ...], list[LayerRecord]] = {}
        fmt = spec_format(compression)
        for rec in prior.reusable:
            if spec_format(rec.compression) == fmt and rec.media_type == media_type:
                self.by_key.setdefault(rec.content_key, rec)
                # An earlier image in the OCI layout may record names only: a one-package
                # layer is named after its package.
                self.by_packages.setdefault(rec.packages or (rec.name,), []).append(rec)

    def find(self, layer: PlannedLayer, key: str | None, read: bool = True) -> tuple[Reuse | None, str | None]:
        """An earlier blob for this layer, or why a candidate was turned down. With
        `read` false, raises MustRead where the answer needs a blob read: the records
        answer for the blobs of an unchanged rebuild with a stat each, and the caller
        reads the others on worker threads."""
        if key is None:
            return None, None
        cached = self.cached(layer, key, read)
        if cached is not None:
            return cached, None
        exact = self.by_key.get(key)
        if exact is not None:
            src = self._blob_dir(exact, read)
            if src is not None and self.verify and not self._holds(src, exact, read):
                return None, (
                    f"input blob {exact.digest} in {src.root} for layer {layer.name} does not hold the layer "
                    "its history says (content key or diff_id differ); rebuilding the layer"
                )
            if src is not None or exact.digest in self.prior.remote_blobs:
                return Reuse(_renamed(exact, layer)), None
            return None, (
                f"input blob {exact.digest} for layer {layer.name} is missing or does not "
                "match its digest; rebuilding the layer"
            )
        pristine = self._pristine(layer, read)
        return (Reuse(_renamed(pristine, layer)) if pristine else None), None

    def cached(self, layer: PlannedLayer, key: str, read: bool = True) -> Reuse | None:
        """The cached layer of this key, made present in the output; None when not cached.
        With `read` false, raises MustRead where that needs a blob read or copied."""
        cache = self.prior.cache
        if cache is None:
            return None
        # A lookup made by a call that raised MustRead is the one the next call uses (it
        # counts a hit or a miss).
        name = layer.name
        rec = self._looked_up.pop(name) if name in self._looked_up else cache.lookup(key, self.compression)
        if rec is None or rec.media_type != self.media_type:
            return None
        out = self.output
        present = out is cache.blobs or (out.has(rec.digest) and out.size(rec.digest) == rec.size)
        chunked = self.compression.startswith("zstd:chunked") and not rec.annotations
        if not read and (chunked or not present):
            self._looked_up[name] = rec
            raise MustRead
        if chunked:
            # The cache records no annotations: read them back from the blob's footer.
            from .zstd_chunked import read_annotations  # here: anycrc and zstandard slow every start

            try:
                with open(cache.blobs.path(rec.digest), "rb") as f:
                    notes = read_annotations(f, rec.size)
            except (PkglayerError, OSError) as e:
                log.warning("layer cache: blob %s: %s", rec.digest, e)
                return None
            rec = replace(rec, annotations=tuple(sorted(notes.items())))
        if not present:
            try:
                cache.export(rec.digest, out, rec.size)
            except (PkglayerError, OSError) as e:  # evicted meanwhile: write it instead
                log.warning("layer cache: %s", e)
                return None
        return Reuse(_renamed(rec, layer), cached=True)

    def _blob_dir(self, rec: LayerRecord, read: bool = True) -> BlobDir | None:
        for d in self.sources:
            if not d.has(rec.digest):
                continue
            if d.vouched(rec.digest, rec.size, self.records.of(d.root)):
                return d
            if not read:
                raise MustRead
            if d.verify(rec.digest, rec.size, self.records.of(d.root)):
                return d
        return None

    def _holds(self, src: BlobDir, rec: LayerRecord, read: bool = True) -> bool:
        """The blob (already checked against its digest) holds the layer of `rec`'s
        content key and diff_id; read through once per blob file, then remembered."""
        try:
            st = os.lstat(src.path(rec.digest))
        except OSError:
            return False
        cache = self.records.of(src.root)
        known = cache.get(st, (_IDENTITY,)) if cache is not None else None
        if known is None:
            if not read:
                raise MustRead
            from .pristine import blob_identity  # here: it loads the tar reader, which most builds never use

            started = time.time()
            found = blob_identity(src, rec)
            if found is None:
                return False
            known = {_IDENTITY: f"{rec.digest} {found[0]} {found[1]}"}
            if cache is not None:
                cache.put(st, known, started)
        return known[_IDENTITY] == f"{rec.digest} {rec.content_key} {rec.diff_id}"

    def _pristine(self, layer: PlannedLayer, read: bool = True) -> LayerRecord | None:
        own = self.ownership
        edited = [e for key in layer.packages for e in own.modified_by_package.get(key, ())]
        if not edited:
            return None
        if not read:
            raise MustRead
        from .pristine import is_pristine_layer  # here: it loads the tar reader, which most builds never use

        expected = layer_members(
            [*(o for h in layer.homes for o in own.homes.get(h, [])), *(obj for obj, _ in edited)],
            own.objects,
            self.dir_mtime,
            self.with_root,
        )
        wanted = {obj.path: (obj, rec) for obj, rec in edited}
        for rec in self.by_packages.get(layer.packages, []):
            src = self._blob_dir(rec)
            if src is not None and is_pristine_layer(src, rec, expected, wanted):
                return rec
        return None


def _renamed(rec: LayerRecord, layer: PlannedLayer) -> LayerRecord:
    """An earlier layer's blob under this build's name and membership."""
    return replace(rec, name=layer.name, packages=layer.packages, components=layer.components)
