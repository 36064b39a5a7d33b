"""Dirty tracking: named bitmaps of the ranges written since a point in time, and the layer that
marks them.

Block layer, directly over a disk's storage node (under any fault layer): every write,
write-zeroes and discard that passes :class:`DirtyLayer` marks its range in the disk's enabled
bitmaps *before* it goes down, so a write that fails still counts as a change (a backup that
copies one range too many is right; one that misses a range is not). A :class:`Bitmap` is QEMU's
dirty bitmap: one bit per ``granularity`` bytes, bit ``n`` covering ``[n*g, (n+1)*g)``, kept as the
bit array the qcow2 bitmaps extension stores (byte ``k`` bit ``j`` is chunk ``8k+j``). A bitmap
loaded from an image that was not closed cleanly is *inconsistent*: kept, listed, stored back as
it was, but never marked, read or exported (QEMU's rule); only removing it is allowed.

Persistence is a :class:`BitmapStore`'s: the qcow2 node keeps bitmaps in its image
(:mod:`device.block.qcow2_bitmaps`), a raw image in a sidecar file
(:mod:`device.block.bitmap_sidecar`). A store marks what it loads as in use on a writable open,
and :meth:`DirtyLayer.close` saves every persistent bitmap, in use cleared, before the storage
closes. The device may call the data path from worker threads; one lock guards the bitmaps.
"""

from __future__ import annotations

import dataclasses
import errno
import re
import threading
from collections.abc import Mapping, Sequence
from typing import Any, Final, Protocol

import structlog
from mypy_extensions import mypyc_attr

from device.block.fleece import View
from device.block.node import BlockError, BlockNode, Completion, Layer

log = structlog.get_logger("vblk.device.block")

DEFAULT_GRANULARITY: Final = 64 * 1024  # QEMU's for a qcow2 image of 64 KiB clusters
MIN_GRANULARITY: Final = 512  # the qcow2 extension's granularity_bits 9..31, as QEMU takes them
MAX_GRANULARITY: Final = 1 << 31
MAX_NAME_BYTES: Final = 1023  # the qcow2 extension's limit
MAX_BITMAP_BYTES: Final = 512 << 20  # one bitmap in memory (QEMU's BME_MAX_PHYS_SIZE)
MAX_DISK_BITMAP_BYTES: Final = 1 << 30  # all bitmaps of one disk
MAX_BITMAPS: Final = 65535  # per disk (QEMU's per image)

_NOT_ZERO: Final = re.compile(b"[^\x00]")
_NOT_ONES: Final = re.compile(b"[^\xff]")
_ONES: Final = b"\xff" * 4096


@mypyc_attr(native_class=False)  # an OSError, as BlockError
class BitmapError(BlockError):
    """A bitmap operation refused: ``errno`` says why (ENOENT unknown, EEXIST taken, EBUSY
    inconsistent, EINVAL a bad name or granularity, ENOSPC over the memory budget, ENOTSUP not
    persistent here)."""


def bitmap_bytes(size: int, granularity: int) -> int:
    """Bytes of a bitmap of ``granularity`` over ``size`` bytes of disk."""
    bits = -(-size // granularity)
    return -(-bits // 8)


def check_name(name: str, *, new: bool = True) -> None:
    """A bitmap name: 1 to 1023 bytes of UTF-8 (the qcow2 extension's rule, all a stored bitmap's
    name must meet); a ``new`` one, made here, is also printable and has no ``/``."""
    encoded = name.encode("utf-8", "surrogatepass")
    if not encoded or len(encoded) > MAX_NAME_BYTES:
        raise BitmapError(errno.EINVAL, f"a bitmap name has 1 to {MAX_NAME_BYTES} bytes, not {len(encoded)}")
    if new and ("/" in name or not name.isprintable()):
        raise BitmapError(errno.EINVAL, "a bitmap name is printable characters, without '/'")


def check_granularity(granularity: int) -> None:
    if granularity < MIN_GRANULARITY or granularity > MAX_GRANULARITY or granularity & (granularity - 1):
        raise BitmapError(
            errno.EINVAL,
            f"granularity {granularity}: a power of two from {MIN_GRANULARITY} to {MAX_GRANULARITY}",
        )


@dataclasses.dataclass(slots=True)
class BitmapRecord:
    """A bitmap as a store keeps it: what :meth:`BitmapStore.load` finds and ``save`` writes."""

    name: str
    granularity: int
    #: Recording (qcow2's ``auto`` flag): it marks every write.
    enabled: bool
    #: Found in use: the image was not closed cleanly, so the bits may miss writes.
    in_use: bool
    #: The bit array, :func:`bitmap_bytes` long, tail bits zero.
    data: bytes


class BitmapStore(Protocol):
    """Where a disk's persistent bitmaps live across runs (its image, or a file beside it)."""

    @property
    def where(self) -> str:
        """For people: ``qcow2 image a.qcow2``, ``sidecar file a.img.bitmaps``."""
        ...

    def refusal(self) -> str | None:
        """Why this store cannot keep persistent bitmaps (a read-only disk, a v2 image), or None."""
        ...

    def load(self) -> list[BitmapRecord]:
        """The bitmaps stored, as found (``in_use`` as it was); on a writable open the store has
        marked them all in use before it returns, so a crash from now on leaves them inconsistent."""
        ...

    def save(self, records: Sequence[BitmapRecord]) -> None:
        """Store exactly these bitmaps (the ones left out are removed), durably; the consistent
        ones with ``in_use`` clear, the inconsistent ones as they were."""
        ...


class Bitmap:
    """One dirty bitmap over a disk of ``size`` bytes."""

    def __init__(
        self,
        name: str,
        size: int,
        granularity: int = DEFAULT_GRANULARITY,
        *,
        enabled: bool = True,
        persistent: bool = False,
        inconsistent: bool = False,
        data: bytes | None = None,
    ) -> None:
        check_name(name, new=False)
        check_granularity(granularity)
        self.name = name
        self.granularity = granularity
        self.shift = granularity.bit_length() - 1
        self.enabled = enabled
        self.persistent = persistent
        self.inconsistent = inconsistent
        self.size = size
        self.nbits = -(-size // granularity)
        nbytes = -(-self.nbits // 8)
        if data is None:
            self.bits = bytearray(nbytes)
        else:
            if len(data) != nbytes:
                raise BitmapError(
                    errno.EINVAL,
                    f"bitmap '{name}': {len(data)} bytes of data, not the {nbytes} its size needs",
                )
            self.bits = bytearray(data)
            self._clear_tail()

    # -- marking (the data path, under the layer's lock) ------------------------------------------

    def mark(self, offset: int, length: int) -> None:
        """Set the bits of every chunk ``[offset, offset+length)`` touches."""
        if length <= 0 or offset >= self.size:
            return
        shift = self.shift
        first = offset >> shift
        last = (min(offset + length, self.size) - 1) >> shift
        bits = self.bits
        if first == last:
            bits[first >> 3] |= 1 << (first & 7)
            return
        self._set_range(first, last + 1)

    def _set_range(self, first: int, end: int) -> None:
        """Set bits ``[first, end)``."""
        bits = self.bits
        head_byte = first >> 3
        tail_byte = end >> 3
        if head_byte == tail_byte:
            bits[head_byte] |= ((1 << (end - first)) - 1) << (first & 7)
            return
        if first & 7:
            bits[head_byte] |= (0xFF << (first & 7)) & 0xFF
            head_byte += 1
        while head_byte < tail_byte:
            take = min(tail_byte - head_byte, len(_ONES))
            bits[head_byte : head_byte + take] = _ONES[:take]
            head_byte += take
        if end & 7:
            bits[tail_byte] |= (1 << (end & 7)) - 1

    # -- reading --------------------------------------------------------------------------------

    def bit(self, n: int) -> bool:
        return bool(self.bits[n >> 3] >> (n & 7) & 1)

    def _run_end(self, n: int, dirty: bool) -> int:
        """The first bit from ``n`` on that is not ``dirty`` (``nbits`` if none)."""
        nbits = self.nbits
        while n < nbits and n & 7:
            if self.bit(n) != dirty:
                return n
            n += 1
        if n >= nbits:
            return nbits
        found = (_NOT_ONES if dirty else _NOT_ZERO).search(self.bits, n >> 3)
        if found is None:
            return nbits
        n = found.start() * 8
        while n < nbits and self.bit(n) == dirty:
            n += 1
        return min(n, nbits)

    def runs(self, offset: int, length: int) -> list[tuple[int, int, bool]]:
        """``(offset, length, dirty)`` runs covering ``[offset, offset+length)`` exactly, in order,
        neighbours never alike (clipped to the disk's size)."""
        end = min(offset + length, self.size)
        out: list[tuple[int, int, bool]] = []
        position = offset
        shift = self.shift
        while position < end:
            n = position >> shift
            dirty = self.bit(n)
            stop = min(self._run_end(n + 1, dirty) << shift, end)
            out.append((position, stop - position, dirty))
            position = stop
        return out

    def dirty_bytes(self) -> int:
        """Bytes of disk the set bits cover (the last chunk counted to the disk's end)."""
        count = int.from_bytes(self.bits, "little").bit_count()
        if count and self.size % self.granularity and self.bit(self.nbits - 1):
            count -= 1
            return count * self.granularity + self.size % self.granularity
        return count * self.granularity

    # -- changing ---------------------------------------------------------------------------------

    def clear(self) -> None:
        self.bits[:] = bytes(len(self.bits))

    def merge_from(self, source: Bitmap) -> None:
        """OR ``source``'s dirty ranges into this one (any granularity: a coarser target rounds out)."""
        if source.granularity == self.granularity and source.size == self.size:
            merged = int.from_bytes(self.bits, "little") | int.from_bytes(source.bits, "little")
            self.bits[:] = merged.to_bytes(len(self.bits), "little")
            return
        for offset, length, dirty in source.runs(0, source.size):
            if dirty:
                self.mark(offset, length)

    def resize(self, size: int) -> None:
        """Cover ``size`` bytes: a grown tail is clean, a cut one forgotten."""
        self.size = size
        self.nbits = -(-size // self.granularity)
        nbytes = -(-self.nbits // 8)
        if nbytes < len(self.bits):
            del self.bits[nbytes:]
        else:
            self.bits.extend(bytes(nbytes - len(self.bits)))
        self._clear_tail()

    def _clear_tail(self) -> None:
        if self.nbits & 7 and self.bits:
            self.bits[-1] &= (1 << (self.nbits & 7)) - 1

    def record(self) -> BitmapRecord:
        return BitmapRecord(self.name, self.granularity, self.enabled, self.inconsistent, bytes(self.bits))

    def describe(self) -> dict[str, Any]:
        """The bitmap's state as QEMU's ``query-block`` tells it, with vblk's names."""
        return {
            "name": self.name,
            "granularity": self.granularity,
            "recording": self.enabled and not self.inconsistent,
            "persistent": self.persistent,
            "inconsistent": self.inconsistent,
            "dirty_bytes": 0 if self.inconsistent else self.dirty_bytes(),
            "size": self.size,
        }


class DirtyLayer(Layer):
    """Marks every change in the disk's enabled bitmaps, and holds the bitmaps (by name)."""

    kind = "dirty"

    def __init__(self, inner: BlockNode, store: BitmapStore | None = None) -> None:
        super().__init__(inner)
        self.store = store
        self.lock = threading.Lock()  # the data path may run in worker threads
        self._bitmaps: dict[str, Bitmap] = {}
        self._recording: list[Bitmap] = []  # the enabled, consistent ones: what a write marks
        self._internal: list[Bitmap] = []  # recording, never listed (a commit's tracking)
        #: Counts changes to the set of bitmaps (added, removed): front ends that list them
        #: (NBD's meta contexts) know when to look again.
        self.generation = 0
        #: Point-in-time views (:mod:`device.block.fleece`): before a change goes down, each
        #: copies the old data it still needs. ``view_lock`` orders copies against view reads.
        self.views: dict[str, View] = {}
        #: A commit is moving the storage: no view may start (it would read the node replaced).
        self.replacing = False
        self._copying: list[View] = []
        self.view_lock = threading.Lock()
        if store is not None:
            size = inner.size
            for record in store.load():
                bitmap = Bitmap(
                    record.name,
                    size,
                    record.granularity,
                    enabled=record.enabled,
                    persistent=True,
                    inconsistent=record.in_use,
                    data=record.data,
                )
                self._bitmaps[bitmap.name] = bitmap
                if record.in_use:
                    log.warning(
                        "bitmap_inconsistent", bitmap=record.name, where=store.where,
                        reason="in use when loaded: the image was not closed cleanly",
                    )  # fmt: skip
            self._rebuild()

    # -- the data path --------------------------------------------------------------------------

    def _mark(self, offset: int, length: int) -> None:
        with self.lock:
            for bitmap in self._recording:
                bitmap.mark(offset, length)

    def writev(self, offset: int, buffers: Sequence[memoryview], done: Completion) -> None:
        if self._recording or self._copying:
            length = 0
            for buffer in buffers:
                length += buffer.nbytes
            self._before_change(offset, length)
        self._inner.writev(offset, buffers, done)

    def discard(self, offset: int, length: int, done: Completion) -> None:
        if self._recording or self._copying:
            self._before_change(offset, length)
        self._inner.discard(offset, length, done)

    def write_zeroes(self, offset: int, length: int, may_unmap: bool, done: Completion) -> None:
        if self._recording or self._copying:
            self._before_change(offset, length)
        self._inner.write_zeroes(offset, length, may_unmap, done)

    def _before_change(self, offset: int, length: int) -> None:
        """Mark the recording bitmaps, and have every view save what the change overwrites."""
        if self._recording:
            self._mark(offset, length)
        if self._copying:
            with self.view_lock:
                for view in self._copying:
                    view.before_change(offset, length)

    # -- the storage underneath (snapshots and commits: the caller holds the device drained) -------

    def replace_inner(self, node: BlockNode, store: BitmapStore | None, *, loaded: bool = False) -> None:
        """Go on with ``node`` as the storage (a new overlay, or the base a commit went back to),
        its persistent bitmaps in ``store``. The bitmaps in memory carry on: what ``store`` holds is
        only marked in use (``load``, unless the caller ``loaded`` it already), and overwritten by
        the next save."""
        if self.views:
            raise BlockError(errno.EBUSY, "the disk has point-in-time views: remove them first")
        if store is not None and not loaded:
            store.load()
        with self.lock:
            self._inner = node
            self.store = store
            self.generation += 1

    def track(self, granularity: int = DEFAULT_GRANULARITY) -> Bitmap:
        """An internal recording bitmap (a commit's): marked like the others, never listed."""
        bitmap = Bitmap("(internal)", self.size, granularity)
        with self.lock:
            self._internal.append(bitmap)
            self._rebuild()
        return bitmap

    def take(self, bitmap: Bitmap) -> list[tuple[int, int]]:
        """The dirty ``(offset, length)`` runs of ``bitmap``, which is cleared at the same time."""
        with self.lock:
            runs = [(offset, length) for offset, length, dirty in bitmap.runs(0, bitmap.size) if dirty]
            bitmap.clear()
        return runs

    def untrack(self, bitmap: Bitmap) -> None:
        with self.lock:
            if bitmap in self._internal:
                self._internal.remove(bitmap)
            self._rebuild()

    # -- views (control plane, on the loop; the caller holds the device drained) -------------------

    def add_view(self, name: str, scratch: str, limit: int) -> View:
        """A point-in-time view of the disk from now on, saving old data in the file ``scratch``
        (made here, removed with the view) up to ``limit`` bytes."""
        if name in self.views:
            raise BitmapError(errno.EEXIST, f"a view is already named '{name}'")
        if self.replacing:
            raise BitmapError(errno.EBUSY, "a commit is running: start the view when it is done")
        if not self._inner.capabilities.blocking:
            raise BitmapError(
                errno.ENOTSUP, "point-in-time views need storage whose operations complete at once (not RBD)"
            )
        view = View(name, self._inner, scratch, limit)
        with self.view_lock:
            self.views[name] = view
            self._copying = list(self.views.values())
        return view

    def remove_view(self, name: str) -> View:
        view = self.views.get(name)
        if view is None:
            raise BitmapError(errno.ENOENT, f"no view is named '{name}'")
        with self.view_lock:
            del self.views[name]
            self._copying = list(self.views.values())
            view.close()
        return view

    def resize(self, new_size: int) -> None:
        if self.views:
            raise BlockError(errno.EBUSY, "the disk has point-in-time views: remove them before resizing")
        if self.replacing:
            raise BlockError(errno.EBUSY, "a commit is running: resize the disk when it is done")
        self._inner.resize(new_size)
        with self.lock:
            for bitmap in [*self._bitmaps.values(), *self._internal]:
                bitmap.resize(new_size)

    # -- the bitmaps (control plane, on the loop) -------------------------------------------------

    def _rebuild(self) -> None:
        self.generation += 1
        self._recording = [b for b in self._bitmaps.values() if b.enabled and not b.inconsistent]
        self._recording.extend(self._internal)

    @property
    def bitmaps(self) -> Mapping[str, Bitmap]:
        return self._bitmaps

    def get(self, name: str, *, usable: bool = True) -> Bitmap:
        """The bitmap named ``name`` (ENOENT); ``usable``: refused when inconsistent (EBUSY)."""
        bitmap = self._bitmaps.get(name)
        if bitmap is None:
            raise BitmapError(errno.ENOENT, f"no bitmap is named '{name}'")
        if usable and bitmap.inconsistent:
            raise BitmapError(
                errno.EBUSY,
                f"bitmap '{name}' is inconsistent (it was in use when its image was last closed, "
                f"so it may miss writes): it can only be removed",
            )
        return bitmap

    def _hook(self, bitmap: Bitmap, hook: str, *args: Any) -> None:
        """Tell the store of a persistent bitmap's change, where it acts on changes (RBD's makes
        snapshots); a store that keeps bitmaps only at close has no such hooks."""
        store = self.store
        if not bitmap.persistent or store is None:
            return
        act = getattr(store, hook, None)
        if act is not None:
            act(*args)

    def persistence_refusal(self) -> str | None:
        """Why persistent bitmaps cannot be kept for this disk, or None."""
        if self.store is None:
            return "this disk's storage has nowhere to keep bitmaps across runs"
        return self.store.refusal()

    def add(
        self,
        name: str,
        granularity: int = DEFAULT_GRANULARITY,
        *,
        persistent: bool = False,
        enabled: bool = True,
    ) -> Bitmap:
        """A new, clean bitmap (EEXIST for a name taken, ENOTSUP for persistence it cannot have)."""
        check_name(name)
        check_granularity(granularity)
        if name in self._bitmaps:
            raise BitmapError(errno.EEXIST, f"a bitmap is already named '{name}'")
        if len(self._bitmaps) >= MAX_BITMAPS:
            raise BitmapError(errno.ENOSPC, f"a disk has at most {MAX_BITMAPS} bitmaps")
        if persistent:
            refusal = self.persistence_refusal()
            if refusal is not None:
                raise BitmapError(errno.ENOTSUP, f"bitmap '{name}' cannot be persistent: {refusal}")
        size = self.size
        need = bitmap_bytes(size, granularity)
        if need > MAX_BITMAP_BYTES:
            raise BitmapError(
                errno.ENOSPC,
                f"a bitmap of granularity {granularity} over {size} bytes needs {need} bytes of memory "
                f"(at most {MAX_BITMAP_BYTES}): choose a coarser granularity",
            )
        held = sum(len(b.bits) for b in self._bitmaps.values())
        if held + need > MAX_DISK_BITMAP_BYTES:
            raise BitmapError(
                errno.ENOSPC,
                f"this disk's bitmaps would need more than {MAX_DISK_BITMAP_BYTES} bytes of memory",
            )
        bitmap = Bitmap(name, size, granularity, enabled=enabled, persistent=persistent)
        self._hook(bitmap, "bitmap_added", bitmap)
        with self.lock:
            self._bitmaps[name] = bitmap
            self._rebuild()
        return bitmap

    def remove(self, name: str) -> Bitmap:
        bitmap = self.get(name, usable=False)
        self._hook(bitmap, "bitmap_removed", name)
        with self.lock:
            del self._bitmaps[name]
            self._rebuild()
        return bitmap

    def set_enabled(self, name: str, enabled: bool) -> Bitmap:
        bitmap = self.get(name)
        if bitmap.enabled != enabled:
            self._hook(bitmap, "bitmap_enabled", name, enabled)
        with self.lock:
            bitmap.enabled = enabled
            self._rebuild()
        return bitmap

    def clear(self, name: str) -> Bitmap:
        bitmap = self.get(name)
        self._hook(bitmap, "bitmap_cleared", name)
        with self.lock:
            bitmap.clear()
        return bitmap

    def merge(self, target: str, sources: Sequence[str]) -> Bitmap:
        """OR ``sources`` into ``target`` (which keeps its own bits), as QEMU's merge."""
        into = self.get(target)
        froms = [self.get(name) for name in sources]
        refuse = getattr(self.store, "merge_refusal", None) if into.persistent else None
        if refuse is not None:
            raise BitmapError(errno.ENOTSUP, refuse())
        with self.lock:
            for source in froms:
                if source is not into:
                    into.merge_from(source)
        return into

    def checkpoint(
        self, name: str, granularity: int = DEFAULT_GRANULARITY, *, persistent: bool = False
    ) -> tuple[Bitmap, list[str]]:
        """A new recording bitmap, and every other one that was recording disabled, at one
        instant (the caller holds the device quiesced): no write falls between the two."""
        recording = [b for b in self._recording if b not in self._internal]
        bitmap = self.add(name, granularity, persistent=persistent)
        for old in recording:
            self._hook(old, "bitmap_enabled", old.name, False)
        with self.lock:
            for old in recording:
                old.enabled = False
            self._rebuild()
        return bitmap, [old.name for old in recording]

    def undo_checkpoint(self, name: str, disabled: Sequence[str]) -> None:
        """Take back :meth:`checkpoint` (the caller holds the device drained): what the new bitmap
        recorded goes into the ones it disabled, which record again, and the new one goes."""
        new = self._bitmaps.get(name)
        olds = [b for b in (self._bitmaps.get(n) for n in disabled) if b is not None]
        for old in olds:
            self._hook(old, "bitmap_enabled", old.name, True)
        if new is not None:
            self._hook(new, "bitmap_removed", name)
        with self.lock:
            for old in olds:
                if new is not None:
                    old.merge_from(new)
                old.enabled = True
            if new is not None:
                del self._bitmaps[name]
            self._rebuild()

    def runs(self, name: str, offset: int, length: int) -> list[tuple[int, int, bool]]:
        """``(offset, length, dirty)`` runs of bitmap ``name`` over ``[offset, offset+length)``."""
        bitmap = self.get(name)
        with self.lock:
            return bitmap.runs(offset, length)

    # -- the rest of the node ---------------------------------------------------------------------

    def describe(self) -> dict[str, Any]:
        return {"node": self.kind, "bitmaps": sorted(self._bitmaps)}

    def counters(self) -> Mapping[str, int]:
        return {
            "bitmaps": len(self._bitmaps),
            "bitmaps_recording": len(self._recording) - len(self._internal),
        }

    def save(self) -> None:
        """Store the persistent bitmaps now (their store's ``save``); close does it too."""
        store = self.store
        if store is None or store.refusal() is not None:
            return
        with self.lock:
            records = [b.record() for b in self._bitmaps.values() if b.persistent]
        store.save(records)

    def close(self) -> None:
        for name in list(self.views):
            self.remove_view(name)
        try:
            self.save()
        except OSError as failed:  # the bitmaps stay in use in the store: inconsistent next time
            log.warning(
                "bitmaps_not_saved", where=self.store.where if self.store else None,
                error=failed.strerror or str(failed),
            )  # fmt: skip
        finally:
            self.store = None
            self._inner.close()


def dirty_layer(node: BlockNode) -> DirtyLayer | None:
    """The dirty layer of a stack ``node`` tops, if it has one."""
    current: BlockNode | None = node
    while current is not None:
        if isinstance(current, DirtyLayer):
            return current
        current = current.inner
    return None
