"""The driver/device boundary: the driver sees only the platform interface and spec constants."""

from __future__ import annotations

import ast
import pathlib

import pytest

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


@pytest.mark.parametrize("front_end", ["nbd", "http"])
def test_the_front_ends_reach_disks_only_through_the_disk_port(front_end: str) -> None:
    """service/nbd and service/http import nothing from driver/ or device/: a disk is a
    service.blockio.ByteDisk, its rings a service.rings snapshot."""
    offenders = []
    files = sorted((ROOT / "service" / front_end).rglob("*.py"))
    assert len(files) >= 4, f"service/{front_end} not found"
    for path in files:
        for name in _imports(path):
            if name.split(".")[0] in ("device", "driver"):
                offenders.append(f"{path.relative_to(ROOT)}: {name}")
    assert offenders == []


def _module_graph(packages: list[str]) -> dict[str, set[str]]:
    """Project module -> the project modules it imports (TYPE_CHECKING imports too)."""
    files = {}
    for package in packages:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            files[name] = path
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        graph[name] = {imported for imported in _imports(path) if imported in files and imported != name}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_module_imports_itself_through_others() -> None:
    graph = _module_graph(["device", "driver", "service", "bench"])
    assert len(graph) > 60
    assert _cycles(graph) == []


def test_the_cycle_check_catches_a_circle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []
