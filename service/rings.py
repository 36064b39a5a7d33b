"""Snapshots of a disk's virtqueues, read-only: what the ring view (``/ui``) shows.

Service layer, beside the disk port: per queue, what the driver knows (free list, chains in
flight, shadow indices, kicks), what the device knows (``last_avail_idx``, ``used_idx``, chains it
holds, interrupts) and what the ring memory says (``avail.idx``, ``used.idx``, ``used_event``,
``avail_event``, the latest ring entries, every in-flight chain's descriptors and the request
header they carry), plus what happened between two snapshots: the queues' counters of chains per
head, per kick, per device pass and per interrupt, and the peak of chains in flight.

Observation only: a snapshot reads driver and device attributes and copies ring memory; it never
writes guest memory or changes a queue (it only restarts the in-flight watermark).
"""

from __future__ import annotations

import struct
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from device.packed_virtqueue import PackedDeviceVirtqueue
from device.spec import virtio_blk as vb
from device.spec.virtio import (
    VIRTQ_DESC,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    VIRTQ_DESC_SIZE,
    VIRTQ_USED_ELEM,
    avail_ring_size,
    desc_table_size,
    used_ring_size,
)
from device.spec.virtio_packed import PVIRTQ_DESC, PVIRTQ_EVENT, desc_ring_size, is_used
from device.virtqueue import DeviceVirtqueue
from driver.blk import OPERATIONS
from driver.packed_virtqueue import PackedDriverVirtqueue
from driver.virtqueue import DriverVirtqueue
from service.latency import LATENCY_BUCKETS, LatencyHistogram

if TYPE_CHECKING:
    from device.platform import GuestRam
    from service.model import Disk

RECENT = 8  # ring entries shown before avail.idx and used.idx
MAX_CHAINS = 64  # chains listed per queue (all are counted)
MAX_CHAIN_DESCRIPTORS = 8  # descriptors listed per chain

# Descriptor table cells: free, head of a chain in flight, head pointing at an indirect table,
# a later descriptor of a chain in flight.
FREE, HEAD, INDIRECT, CHAINED = ".", "h", "i", "c"

_U16 = struct.Struct("<H")
_TYPE_NAMES = {int(t): t.name for t in vb.RequestType}
_OP_NAMES = {int(t): op for t, op in OPERATIONS.items()}


def _flags(flags: int) -> str:
    names = [
        name
        for bit, name in ((VIRTQ_DESC_F_NEXT, "N"), (VIRTQ_DESC_F_WRITE, "W"), (VIRTQ_DESC_F_INDIRECT, "I"))
        if flags & bit
    ]
    return "|".join(names)


def _chain_descriptors(memory: GuestRam, table: bytes, chain: list[int]) -> tuple[bool, list[dict[str, Any]]]:
    """The descriptors of one chain (its indirect table's, if the head is indirect)."""
    addr, length, flags, _ = VIRTQ_DESC.unpack_from(table, VIRTQ_DESC_SIZE * chain[0])
    indirect = bool(flags & VIRTQ_DESC_F_INDIRECT)
    entries: list[tuple[int, int, int, int, int]] = []
    if indirect:
        count = length // VIRTQ_DESC_SIZE
        try:
            raw = memory.read(addr, count * VIRTQ_DESC_SIZE)
        except Exception:  # the ring says where; never trust it enough to fail the page
            raw = b""
            count = 0
        entries = [(i, *VIRTQ_DESC.unpack_from(raw, VIRTQ_DESC_SIZE * i)) for i in range(count)]
    else:
        entries = [(i, *VIRTQ_DESC.unpack_from(table, VIRTQ_DESC_SIZE * i)) for i in chain]
    return indirect, _described(entries)


def _described(entries: Sequence[tuple[int, int, int, int, int | None]]) -> list[dict[str, Any]]:
    """``(index, addr, len, flags, next)`` descriptors of one chain, each with its role in a
    virtio-blk request: the header first, the status byte last, data between."""
    described = []
    last_writable = max((n for n, e in enumerate(entries) if e[3] & VIRTQ_DESC_F_WRITE), default=-1)
    for n, (index, d_addr, d_len, d_flags, d_next) in enumerate(entries):
        if n == 0 and not d_flags & VIRTQ_DESC_F_WRITE:
            role = "header"
        elif n == last_writable and n == len(entries) - 1 and d_len == 1:
            role = "status"
        else:
            role = "data"
        described.append(
            {
                "index": index,
                "addr": d_addr,
                "len": d_len,
                "flags": _flags(d_flags),
                "next": d_next,
                "role": role,
            }
        )
    return described


def _request(memory: GuestRam, descriptors: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The virtio-blk header and status byte the chain carries (as the device will read them)."""
    if (
        not descriptors
        or descriptors[0]["role"] != "header"
        or descriptors[0]["len"] < vb.VIRTIO_BLK_OUTHDR_SIZE
    ):
        return None
    try:
        rtype, ioprio, sector = vb.VIRTIO_BLK_OUTHDR.unpack(
            memory.read(descriptors[0]["addr"], vb.VIRTIO_BLK_OUTHDR_SIZE)
        )
        status = memory.read(descriptors[-1]["addr"], 1)[0] if descriptors[-1]["role"] == "status" else None
    except Exception:
        return None
    return {
        "type": _TYPE_NAMES.get(rtype, str(rtype)),
        "op": _OP_NAMES.get(rtype, "unknown"),
        "sector": sector,
        "ioprio": ioprio,
        "bytes": sum(d["len"] for d in descriptors if d["role"] == "data"),
        "status": status,  # 255 until the device writes it
    }


def _window(start: int, end: int, limit: int) -> Iterable[int]:
    """Free-running 16-bit indices from ``start`` up to ``end`` (at most ``limit`` of them)."""
    count = min((end - start) & 0xFFFF, limit)
    return ((start + k) & 0xFFFF for k in range(count))


def batch_histogram(counts: Sequence[int], size: int) -> dict[str, list[Any]]:
    """A batch-size histogram of power-of-two buckets as ``sizes`` ([lo, hi]) and ``batches``.

    Buckets past the one holding ``size`` (the queue's) are left out while they are empty.
    """
    last = max([size.bit_length(), *(k for k, n in enumerate(counts) if n)])
    return {
        "sizes": [[0, 0] if k == 0 else [1 << (k - 1), (1 << k) - 1] for k in range(last + 1)],
        "batches": list(counts[: last + 1]),
    }


def queue_activity(queue: DriverVirtqueue, device_queue: DeviceVirtqueue | None) -> dict[str, Any]:
    """The counters of what happened on the rings, cumulative since the queue was set up.

    The difference of two snapshots is what happened between them; only ``peak_in_flight``
    is per snapshot: the most chains in flight at once since the previous snapshot (whoever
    asked for it), which a chain too quick to be caught in flight still raises.
    """
    size = queue.size
    by_head = [tally.count for tally in queue.chains_by_head]
    return {
        "chains_by_head": by_head,
        "chains_published": sum(by_head),  # avail.idx, unwrapped
        "chains_used": queue.completed,  # used.idx as far as the driver reaped, unwrapped
        "indirect_chains": queue.indirect_chains,
        "peak_in_flight": queue.take_peak_in_flight(),
        "kick_batches": batch_histogram([t.count for t in queue.publish_batches], size),
        "interrupt_batches": batch_histogram([t.count for t in queue.reap_batches], size),
        "device_batches": (
            batch_histogram([t.count for t in device_queue.pop_batches], size)
            if device_queue is not None
            else None
        ),
    }


def queue_snapshot(
    queue: DriverVirtqueue, device_queue: DeviceVirtqueue | None, interrupts: tuple[int, int]
) -> dict[str, Any]:
    """One virtqueue seen from the driver, the device and the ring memory (read-only)."""
    if isinstance(queue, PackedDriverVirtqueue):
        return packed_queue_snapshot(queue, device_queue, interrupts)
    memory = queue.memory
    size = queue.size
    mask = size - 1
    table = memory.read(queue.desc_addr, desc_table_size(size))
    avail = memory.read(queue.avail_addr, avail_ring_size(size))
    used = memory.read(queue.used_addr, used_ring_size(size))
    avail_flags, avail_idx = _U16.unpack_from(avail, 0)[0], _U16.unpack_from(avail, 2)[0]
    used_event = _U16.unpack_from(avail, 4 + 2 * size)[0]
    used_flags, used_idx = _U16.unpack_from(used, 0)[0], _U16.unpack_from(used, 2)[0]
    avail_event = _U16.unpack_from(used, 4 + 8 * size)[0]

    def avail_head(idx: int) -> int:
        return int(_U16.unpack_from(avail, 4 + 2 * (idx & mask))[0])

    def used_elem(idx: int) -> tuple[int, int]:
        head, written = VIRTQ_USED_ELEM.unpack_from(used, 4 + 8 * (idx & mask))
        return int(head), int(written)

    # Where each chain in flight is: published but not yet popped by the device, held by the
    # device, or returned on the used ring and not yet reaped by the driver.
    stage: dict[int, str] = {}
    last_avail = device_queue.last_avail_idx if device_queue is not None else queue.last_used_idx
    for idx in _window(last_avail, avail_idx, size):
        stage[avail_head(idx)] = "avail"
    if device_queue is not None:
        for head in device_queue.inflight:
            stage[head] = "device"
        returned_end = device_queue.used_idx  # pushed entries, published or about to be
    else:
        returned_end = used_idx
    returned = 0
    for idx in _window(queue.last_used_idx, returned_end, size):
        stage[used_elem(idx)[0]] = "used"
        returned += 1

    in_flight = queue.chains_in_flight()
    cells, chains, counts = _chains_in_flight(
        queue,
        in_flight,
        lambda ring_chain: _chain_descriptors(memory, table, ring_chain),
        lambda head: stage.get(head, "unknown"),
    )
    raised, suppressed = interrupts
    # Entries this ring has ever held (a fresh ring shows no stale slots as recent).
    avail_recent = min(RECENT, size, queue.completed + len(in_flight))
    used_recent = min(RECENT, size, queue.completed + returned)
    return {
        "index": queue.index,
        "ring": "split",
        "size": size,
        "vector": device_queue.msix_vector if device_queue is not None else None,
        "event_idx": queue.event_idx,
        "indirect": bool(queue.indirect_max),
        "broken": queue.broken,
        "addresses": {"desc": queue.desc_addr, "avail": queue.avail_addr, "used": queue.used_addr},
        "avail": {
            "flags": avail_flags,
            "idx": avail_idx,
            "used_event": used_event,
            "recent": [
                {"idx": idx, "slot": idx & mask, "head": avail_head(idx)}
                for idx in _window((avail_idx - avail_recent) & 0xFFFF, avail_idx, avail_recent)
            ],
        },
        "used": {
            "flags": used_flags,
            "idx": used_idx,
            "avail_event": avail_event,
            "recent": [
                {"idx": idx, "slot": idx & mask, "id": elem[0], "len": elem[1]}
                for idx in _window((used_idx - used_recent) & 0xFFFF, used_idx, used_recent)
                for elem in (used_elem(idx),)
            ],
        },
        "driver": _driver_state(queue, len(in_flight)),
        "device": {
            "last_avail_idx": device_queue.last_avail_idx if device_queue is not None else None,
            "used_idx": device_queue.used_idx if device_queue is not None else None,
            "in_flight": len(device_queue.inflight) if device_queue is not None else None,
            "interrupts": raised,
            "interrupts_suppressed": suppressed,
        },
        "descriptors": cells,
        "counts": counts,
        "chains": chains,
        "activity": queue_activity(queue, device_queue),
    }


def _chains_in_flight(
    queue: DriverVirtqueue,
    in_flight: list[tuple[int, list[int]]],
    describe: Callable[[list[int]], tuple[bool, list[dict[str, Any]]]],
    stage_of: Callable[[int], str],
) -> tuple[str, list[dict[str, Any]], dict[str, int]]:
    """The descriptor grid (a cell per ring slot), the chains in flight (at most
    :data:`MAX_CHAINS`, each with its request) and the counts, from ``(head, ring slots)`` of
    every chain, how to read a chain's descriptors and where a head is in its round trip."""
    cells = [FREE] * queue.size
    chains: list[dict[str, Any]] = []
    chained = indirect_heads = 0
    for head, slots in in_flight:
        for i in slots[1:]:
            cells[i] = CHAINED
        chained += len(slots) - 1
        indirect, descriptors = describe(slots)
        cells[slots[0]] = INDIRECT if indirect else HEAD
        indirect_heads += indirect
        if len(chains) < MAX_CHAINS:
            chains.append(
                {
                    "head": head,
                    "stage": stage_of(head),
                    "indirect": indirect,
                    "ring_descriptors": len(slots),
                    "request": _request(queue.memory, descriptors),
                    "descriptors": descriptors[:MAX_CHAIN_DESCRIPTORS],
                    "more_descriptors": max(0, len(descriptors) - MAX_CHAIN_DESCRIPTORS),
                }
            )
    counts = {
        "free": queue.num_free,
        "in_flight": len(in_flight),
        "chained": chained,
        "indirect": indirect_heads,
    }
    return "".join(cells), chains, counts


def _driver_state(queue: DriverVirtqueue, in_flight: int) -> dict[str, int]:
    """What the driver knows of one queue: its positions, free descriptors, counters."""
    return {
        "avail_idx": queue.shadow_avail_idx,
        "last_used_idx": queue.last_used_idx,
        "num_free": queue.num_free,
        "free_head": queue.next_head,
        "in_flight": in_flight,
        "kicks": queue.kicks,
        "kicks_suppressed": queue.kicks_suppressed,
        "interrupts": queue.interrupts,
        "completed": queue.completed,
    }


def _packed_entry(data: bytes, slot: int, index: int) -> tuple[int, int, int, int, int | None]:
    addr, length, _id, flags = PVIRTQ_DESC.unpack_from(data, 16 * slot)
    return index, addr, length, flags, None  # a packed list has no next fields


def _packed_chain(memory: GuestRam, ring: bytes, positions: list[int]) -> tuple[bool, list[dict[str, Any]]]:
    """The descriptors of one packed buffer as the ring holds them now (its indirect table's, if
    its first descriptor is indirect; a used descriptor overwrote the first slot's id and len)."""
    addr, length, _id, flags = PVIRTQ_DESC.unpack_from(ring, 16 * positions[0])
    indirect = bool(flags & VIRTQ_DESC_F_INDIRECT)
    entries: list[tuple[int, int, int, int, int | None]] = []
    if indirect:
        count = length // 16
        try:
            raw = memory.read(addr, count * 16)
        except Exception:  # the ring says where; never trust it enough to fail the page
            raw, count = b"", 0
        entries = [_packed_entry(raw, i, i) for i in range(count)]
    else:
        entries = [_packed_entry(ring, i, i) for i in positions]
    return indirect, _described(entries)


def packed_queue_snapshot(
    queue: PackedDriverVirtqueue, device_queue: DeviceVirtqueue | None, interrupts: tuple[int, int]
) -> dict[str, Any]:
    """One packed virtqueue, in the split snapshot's shape where the two agree: ``avail`` and
    ``used`` hold the Driver and Device Event Suppression areas and the positions (wrap counter
    in bit 15) each side has reached; ``descriptors`` marks the ring's slots by the buffers in
    flight; ``ring`` says ``packed``."""
    memory = queue.memory
    size = queue.size
    ring = memory.read(queue.desc_addr, desc_ring_size(size))
    driver_off_wrap, driver_flags = PVIRTQ_EVENT.unpack(memory.read(queue.avail_addr, 4))
    device_off_wrap, device_flags = PVIRTQ_EVENT.unpack(memory.read(queue.used_addr, 4))
    packed_device = device_queue if isinstance(device_queue, PackedDeviceVirtqueue) else None
    in_flight = queue.chains_in_flight()
    lengths = {buffer_id: len(positions) for buffer_id, positions in in_flight}
    # Returned and not yet reaped: the used descriptors from the driver's used position on.
    stage: dict[int, str] = {}
    position, wrap = queue.last_used_idx & 0x7FFF, queue.last_used_idx >> 15
    for _ in range(len(in_flight)):
        _addr, _len, buffer_id, flags = PVIRTQ_DESC.unpack_from(ring, 16 * position)
        if not is_used(flags, wrap) or buffer_id not in lengths:
            break
        stage[buffer_id] = "used"
        position += lengths[buffer_id]
        if position >= size:
            position, wrap = position - size, wrap ^ 1
    held = set(packed_device.slots) if packed_device is not None else set()
    cells, chains, counts = _chains_in_flight(
        queue,
        in_flight,
        lambda positions: _packed_chain(memory, ring, positions),
        lambda buffer_id: stage.get(buffer_id, "device" if buffer_id in held else "avail"),
    )
    raised, suppressed = interrupts
    device_used = (
        packed_device.used_idx | packed_device.used_wrap << 15 if packed_device is not None else None
    )
    return {
        "index": queue.index,
        "ring": "packed",
        "size": size,
        "vector": device_queue.msix_vector if device_queue is not None else None,
        "event_idx": queue.event_idx,
        "indirect": bool(queue.indirect_max),
        "broken": queue.broken,
        "addresses": {"desc": queue.desc_addr, "avail": queue.avail_addr, "used": queue.used_addr},
        "avail": {
            "flags": driver_flags,
            "idx": queue.shadow_avail_idx,
            "used_event": driver_off_wrap,
            "recent": [],
        },
        "used": {
            "flags": device_flags,
            "idx": device_used,
            "avail_event": device_off_wrap,
            "recent": [],
        },
        "driver": _driver_state(queue, len(in_flight)),
        "device": {
            "last_avail_idx": packed_device.avail_idx if packed_device is not None else None,
            "used_idx": device_used,
            "in_flight": len(packed_device.slots) if packed_device is not None else None,
            "interrupts": raised,
            "interrupts_suppressed": suppressed,
        },
        "descriptors": cells,
        "counts": counts,
        "chains": chains,
        "activity": queue_activity(queue, device_queue),
    }


def _latency(disk: Disk, histograms: Mapping[tuple[str, str], LatencyHistogram]) -> dict[str, Any]:
    """The disk's virtio latency histogram, every operation added up (cumulative buckets)."""
    buckets: list[float] = [0.0] * (len(LATENCY_BUCKETS) + 1)
    count = total = 0.0
    for (name, _op), histogram in list(histograms.items()):
        if name != disk.spec.name:
            continue
        for i, (_le, n) in enumerate(histogram.cumulative()):
            buckets[i] += n
        count += histogram.count
        total += histogram.sum
    return {
        "count": count,
        "sum": total,
        "buckets": [[le, n] for le, n in zip([*LATENCY_BUCKETS, "+Inf"], buckets, strict=True)],
    }


def disk_snapshot(disk: Disk, histograms: Mapping[tuple[str, str], LatencyHistogram]) -> dict[str, Any]:
    """Every queue of one disk, plus the counters the page turns into IOPS and latency."""
    driver = disk.driver
    device = disk.device
    stats = driver.statistics()
    device_queues = {q.index: q for q in device.queues}
    by_vector = device.stats.interrupts_by_vector
    queues = []
    for queue in driver.queues:
        device_queue = device_queues.get(queue.index)
        counts = by_vector.get(device_queue.msix_vector) if device_queue is not None else None
        queues.append(queue_snapshot(queue, device_queue, (counts[0], counts[1]) if counts else (0, 0)))
    by_op: dict[str, int] = {}
    for (op, _status), n in stats.requests.items():
        by_op[op] = by_op.get(op, 0) + n
    return {
        "name": disk.spec.name,
        "time": time.time(),
        "pci": driver.name,
        "ready": driver.ready,
        "requests": {
            "completed": sum(stats.requests.values()),
            "errors": sum(n for (_op, status), n in stats.requests.items() if status != "ok"),
            "in_flight": stats.requests_inflight,
            "by_op": by_op,
        },
        "bytes": {"read": stats.bytes_read, "written": stats.bytes_written},
        "latency": _latency(disk, histograms),
        "resets": stats.resets,
        "resubmitted": stats.resubmitted,
        "queues": queues,
    }
