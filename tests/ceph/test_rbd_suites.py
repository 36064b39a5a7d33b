"""The NBD interop suite, the NBD wire suite and the REST suite of tests/service, on RBD disks.

The test functions are the very ones in tests/service; tests/ceph/conftest.py's ``nbd_rig`` puts
both disks on fresh images of a throwaway cluster, so every client (nbdinfo, nbdcopy, qemu-img,
qemu-io, fio, libnbd, curl, nbdkit's curl plugin, aiohttp) and the raw-frame client of the wire
suite (pipelining, malformed and rejected requests, disconnects) run against vblk on Ceph RBD.
"""

from __future__ import annotations

from tests.service.test_nbd_clients import *  # noqa: F403
from tests.service.test_nbd_wire import *  # noqa: F403
from tests.service.test_rest import *  # noqa: F403
