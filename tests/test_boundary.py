"""The driver/device boundary: the driver sees only the platform interface and spec constants."""

from __future__ import annotations

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent
ALLOWED_FROM_DEVICE = {"device.platform"}


def _imports(path: pathlib.Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
            names.extend(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def _allowed(name: str) -> bool:
    if name == "device" or not name.startswith("device."):
        return name != "device"
    return name in ALLOWED_FROM_DEVICE or name.startswith(("device.spec", "device.platform."))


def test_driver_imports_no_device_implementation() -> None:
    offenders = []
    files = sorted((ROOT / "driver").rglob("*.py"))
    assert files, "driver package not found"
    for path in files:
        for name in _imports(path):
            if (name == "device" or name.startswith("device.")) and not _allowed(name):
                offenders.append(f"{path.relative_to(ROOT)}: {name}")
    assert offenders == []


def test_the_boundary_check_catches_a_violation() -> None:
    assert not _allowed("device.virtqueue")
    assert not _allowed("device.blk")
    assert not _allowed("device")
    assert _allowed("device.spec.virtio")
    assert _allowed("device.platform")


def test_the_nbd_front_end_reaches_disks_only_through_the_disk_port() -> None:
    """service/nbd imports nothing from driver/ or device/: every disk is a service.blockio.ByteDisk."""
    offenders = []
    files = sorted((ROOT / "service" / "nbd").rglob("*.py"))
    assert len(files) >= 5, "service/nbd not found"
    for path in files:
        for name in _imports(path):
            if name.split(".")[0] in ("device", "driver"):
                offenders.append(f"{path.relative_to(ROOT)}: {name}")
    assert offenders == []
