"""Opening a disk's storage as its spec says: the block stack under its virtio-blk device.

Service layer, used by :mod:`service.app` (``vblk serve``) and :mod:`service.vhost_user`. A file
image is created sparse or opened at its own size, locked as QEMU locks it, refused when its size
is not the one asked for (or grown, when asked); a qcow2 image (``format=qcow2``) likewise, through
its format node over the file node (a missing one is created empty); RBD images are opened on their cluster;
layers the spec names (``fault=``) go on top.
"""

from __future__ import annotations

import errno

import structlog

from device.block import locks
from device.block.bitmap_sidecar import SidecarStore
from device.block.dirty import BitmapStore, DirtyLayer
from device.block.faults import FaultLayer, FaultPlan
from device.block.file import FileNode
from device.block.memory import MemoryNode
from device.block.node import BlockError, BlockNode
from device.block.qcow2 import Qcow2Node, create_image
from device.block.qcow2_bitmaps import Qcow2BitmapStore
from device.block.rbd import RbdNode, RbdTarget
from device.block.rbd_bitmaps import RbdBitmapStore
from service.model import DiskSpec
from service.values import format_size

log = structlog.get_logger("vblk.service")


def open_stack(spec: DiskSpec) -> BlockNode:
    """A disk's block stack: its storage node, the dirty-tracking layer over it (with the store
    its persistent bitmaps live in), and the layers the spec names above that."""
    storage = open_storage(spec)
    try:
        node: BlockNode = DirtyLayer(storage, _bitmap_store(spec, storage))
    except BaseException:
        storage.close()
        raise
    if spec.fault:
        try:
            node = FaultLayer(node, FaultPlan.parse(spec.fault))
        except ValueError:
            node.close()
            raise
    return node


def _bitmap_store(spec: DiskSpec, storage: BlockNode) -> BitmapStore | None:
    """Where a disk's persistent bitmaps live: a qcow2 image's bitmaps extension, a raw image's
    sidecar file, an RBD image's snapshots (none for memory disks)."""
    if isinstance(storage, Qcow2Node):
        return Qcow2BitmapStore(storage)
    if isinstance(storage, RbdNode):
        return RbdBitmapStore(storage)
    if spec.backend == "file" and spec.format == "raw":
        return SidecarStore(spec.path, storage)
    return None


def open_storage(spec: DiskSpec) -> BlockNode:
    """Open (or create) a disk's storage node; :class:`BlockError` with one sentence if it cannot."""
    if spec.backend == "memory":
        return MemoryNode(spec.size, read_only=spec.read_only)
    if spec.backend == "file" and spec.format == "qcow2":
        return _open_qcow2(spec)
    if spec.backend == "file":
        return _open_image(spec)
    if spec.backend == "rbd":
        ceph = spec.ceph
        target = RbdTarget(
            pool=spec.pool,
            image=spec.rbd_image or spec.name,
            conf_file=ceph.conf,
            client_id=ceph.client_id,
            keyring=ceph.keyring,
            timeout=ceph.timeout,
            create_size=spec.size if spec.create else None,
            read_only=spec.read_only,
            take_over=ceph.take_over,
            cache=spec.cache,
        )
        return RbdNode.open(target)
    raise ValueError(f"unknown storage {spec.backend!r}")


def _open_image(spec: DiskSpec) -> FileNode:
    path = spec.path
    try:
        exists = path.exists()
        if not exists and spec.read_only:
            raise BlockError(errno.ENOENT, f"{path} does not exist (a read-only disk is never created)")
        if not exists:
            path.parent.mkdir(parents=True, exist_ok=True)
        backend = FileNode.open(
            path, size=None if exists else spec.size, read_only=spec.read_only, force_share=spec.force_share
        )
    except BlockError:
        raise
    except OSError as failed:
        where = failed.filename if failed.filename is not None else path
        raise BlockError(failed.errno or errno.EIO, f"{where}: {failed.strerror or failed}") from failed
    except ValueError as bad:  # an image whose size is not a positive multiple of 512
        raise BlockError(errno.EINVAL, str(bad)) from bad
    if exists:
        _fit_or_close(spec, backend, backend.fd)
    return backend


def _open_qcow2(spec: DiskSpec) -> Qcow2Node:
    """A qcow2 image with its backing chain; a missing one is created empty (64 KiB clusters)."""
    path = spec.path
    exists = path.exists()
    if not exists and spec.read_only:
        raise BlockError(errno.ENOENT, f"{path} does not exist (a read-only disk is never created)")
    if not exists:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            create_image(path, spec.size)
        except OSError as failed:
            raise BlockError(failed.errno or errno.EIO, f"{path}: {failed.strerror or failed}") from failed
        log.info("image_created", disk=spec.name, path=str(path), format="qcow2", size=spec.size)
    node = Qcow2Node.open(
        path,
        read_only=spec.read_only,
        force_share=spec.force_share,
        l2_cache_bytes=spec.l2_cache_size,
        snapshot=spec.snapshot,
    )
    if exists:
        _fit_or_close(spec, node, node.host_fd)
    return node


def _fit_or_close(spec: DiskSpec, backend: FileNode | Qcow2Node, fd: int) -> None:
    """An existing image at the size asked for (grown when asked), or closed and refused."""
    if not spec.size_explicit or backend.size == spec.size:
        return
    try:
        _fit(spec, backend, fd)
    except BaseException:
        backend.close()
        raise


def _fit(spec: DiskSpec, backend: FileNode | Qcow2Node, fd: int) -> None:
    """An existing image whose size differs from the one asked for: grow it if asked, else refuse."""
    have, want = backend.size, spec.size
    sizes = f"{spec.path} is {format_size(have)} ({have} bytes), not the {format_size(want)} asked for"
    if want < have:
        raise BlockError(
            errno.EINVAL,
            f"{sizes}; vblk never shrinks an image (that would cut off data): serve it as it is by "
            f"leaving out the size, or shrink it yourself (qemu-img resize --shrink -f {spec.format})",
        )
    if not spec.grow:
        raise BlockError(
            errno.EINVAL,
            f"{sizes}; an existing image is not resized unasked: leave out the size to serve it as "
            f"it is, or add grow (--grow, or grow in the disk spec) to grow it to {format_size(want)}",
        )
    if spec.read_only:
        raise BlockError(errno.EROFS, f"{sizes}; a read-only disk cannot grow its image")
    if locks.held_elsewhere(fd, locks.SHARED_BASE + 3):  # someone lets no one resize it
        raise BlockError(errno.EBUSY, f"{sizes}; another process that has it open refuses resizing")
    backend.resize(want)
    log.info("image_grown", disk=spec.name, path=str(spec.path), old_size=have, size=want)
