"""Fixtures for the Ceph tests: one throwaway cluster per session, fresh RBD images per test.

``nbd_rig`` here overrides the one in tests/service: the same NBD and REST suites, imported by
test_rbd_suites.py, run against RBD-backed disks. Missing Ceph tools fail the tests (``make tools``
installs them); nothing is skipped.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Iterator

import pytest

from device.blk import VirtioBlkDevice
from device.block import ceph
from device.block.node import stack
from device.block.rbd import CACHE_MODES, RbdNode
from service.app import Service
from service.model import CephOptions, DiskSpec
from tests.ceph.cluster import Cluster
from tests.service.conftest import MiB, NbdRig, serving

CLIENT_TIMEOUT = 10.0  # seconds: every Ceph operation of the tests' clients fails after this
_names = itertools.count()


def image_name(prefix: str = "img") -> str:
    return f"{prefix}-{next(_names)}"


@pytest.fixture(scope="session")
def ceph_cluster() -> Iterator[Cluster]:
    cluster = Cluster(client_timeout=CLIENT_TIMEOUT)
    try:
        yield cluster.start()
    finally:
        cluster.stop()


def ceph_options(cluster: Cluster, **overrides: object) -> CephOptions:
    options: dict[str, object] = {"conf": str(cluster.conf), "timeout": CLIENT_TIMEOUT, **overrides}
    return CephOptions(**options)  # type: ignore[arg-type]


def create_image(cluster: Cluster, name: str, size: int) -> None:
    rados = ceph.Rados(str(cluster.conf), "admin", [("rados_osd_op_timeout", "10")])
    try:
        ioctx = rados.open_ioctx(cluster.pool)
        try:
            ceph.image_create(ioctx, name, size)
        finally:
            ceph.ioctx_destroy(ioctx)
    finally:
        rados.shutdown()


def rbd_backend(service: Service, disk: str = "disk0") -> RbdNode:
    device = service.disks[disk].device
    assert isinstance(device, VirtioBlkDevice)
    backend = stack(device.node)[-1]  # the storage, under the dirty-tracking layer
    assert isinstance(backend, RbdNode)
    return backend


@pytest.fixture(params=CACHE_MODES)
async def nbd_rig(ceph_cluster: Cluster, request: pytest.FixtureRequest) -> AsyncIterator[NbdRig]:
    """The service rig of tests/service, with both disks on RBD images of their own.

    Once with librbd's cache off and once with its writeback cache (the ``cache=`` disk option).
    """
    ro_image = image_name("ro")
    await asyncio.to_thread(create_image, ceph_cluster, ro_image, 1 * MiB)
    options = ceph_options(ceph_cluster)
    async with serving(
        DiskSpec(
            name="disk0",
            backend="rbd",
            rbd_image=image_name("disk0"),
            size=64 * MiB,
            create=True,
            cache=request.param,
            ceph=options,
        ),
        DiskSpec(
            name="ro", backend="rbd", rbd_image=ro_image, read_only=True, cache=request.param, ceph=options
        ),
    ) as rig:
        yield rig
