"""Boot Debian's Linux kernel under QEMU (TCG, no KVM) against vblk.

Everything here builds on the host's Debian packages: the kernel and its modules
(``linux-image-amd64``), a static busybox (``busybox-static``), ``nbd-client``,
``mke2fs`` (``e2fsprogs``), ``qemu-system-x86_64`` (``qemu-system-x86``) and ``socat``.
The initramfs is a newc cpio written here, uncompressed (nothing to inflate under TCG).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import hashlib
import lzma
import os
import re
import shutil
import signal
import stat
import struct
import subprocess
import time
import zlib
from collections.abc import Iterable, Sequence
from pathlib import Path

RESULT_MARK = "VBLK-E2E-RESULT"
GUEST_IP = "10.0.2.15"
NBD_FORWARD_IP = "10.0.2.100"  # the guest's view of vblk (QEMU guestfwd → socat → 127.0.0.1)
NBD_PORT = 10809
PAYLOAD_PATH = "/vblk/payload.bin"  # inside the guest's ext4 file system
GUEST_RAM_MIB = 512
STRESS_FS_MIB = 48  # with vblk.stress=N the file system ends here; 16 MiB scratch follow

# Modules the guest loads, by name; their dependencies come from modules.dep. crc32c_generic
# is no hard dependency of ext4 (a softdep through the crypto API), yet metadata_csum needs it.
GUEST_MODULES = ("nbd", "virtio_pci", "virtio_net", "virtio_blk", "crc32c_generic", "ext4")
GUEST_BINARIES = {
    "/sbin/nbd-client": "nbd-client",
    "/sbin/mke2fs": "mke2fs",
    "/sbin/e2fsck": "e2fsck",
    "/sbin/resize2fs": "resize2fs",
}
RESIZE_READY = "vblk-e2e: resize-ready"  # vblk.mode=resize: the host may grow the disk now

# Host tools and the Debian package that provides each one (scripts/install-tools.sh installs them).
HOST_TOOLS = {
    "qemu-system-x86_64": "qemu-system-x86",
    "qemu-storage-daemon": "qemu-system-common",
    "qemu-img": "qemu-utils",
    "qemu-io": "qemu-utils",
    "socat": "socat",
    "nbd-client": "nbd-client",
    "mke2fs": "e2fsprogs",
    "e2fsck": "e2fsprogs",
    "resize2fs": "e2fsprogs",
    "debugfs": "e2fsprogs",
    "dumpe2fs": "e2fsprogs",
    "curl": "curl",
    "ldd": "libc-bin",
}
BUSYBOX = Path("/bin/busybox")


class GuestSetupError(AssertionError):
    """The host lacks something the guest needs: a failure, never a skip."""


def which(tool: str) -> str:
    found = shutil.which(tool) or shutil.which(tool, path="/usr/sbin:/sbin:/usr/bin:/bin")
    if found is None:
        package = HOST_TOOLS.get(tool, tool)
        raise GuestSetupError(
            f"{tool} not found: install Debian package {package} (scripts/install-tools.sh)"
        )
    return found


def check_host_tools() -> None:
    missing = [f"{tool} ({pkg})" for tool, pkg in HOST_TOOLS.items() if not _found(tool)]
    if not BUSYBOX.is_file():
        missing.append(f"{BUSYBOX} (busybox-static)")
    if missing:
        raise GuestSetupError(
            "missing host tools, run scripts/install-tools.sh as root: " + ", ".join(missing)
        )


def _found(tool: str) -> bool:
    try:
        which(tool)
    except GuestSetupError:
        return False
    return True


# --------------------------------------------------------------------------------------------- kernel


@dataclasses.dataclass(frozen=True, slots=True)
class Kernel:
    version: str
    bzimage: Path
    modules: Path  # /lib/modules/<version>


def _version_key(version: str) -> list[int]:
    return [int(n) for n in re.findall(r"\d+", version)]


def find_kernel() -> Kernel:
    """The newest /boot/vmlinuz-<version> whose modules are installed."""
    candidates = []
    for image in Path("/boot").glob("vmlinuz-*"):
        version = image.name.removeprefix("vmlinuz-")
        modules = Path("/lib/modules") / version
        if (modules / "modules.dep").is_file():
            candidates.append(Kernel(version, image, modules))
    if not candidates:
        raise GuestSetupError(
            "no /boot/vmlinuz-* with /lib/modules/<version>/modules.dep: install Debian package "
            "linux-image-amd64 (scripts/install-tools.sh)"
        )
    return max(candidates, key=lambda k: _version_key(k.version))


_XZ_MAGIC = b"\xfd7zXZ\x00"
_GZIP_MAGIC = b"\x1f\x8b\x08"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_ELF_MAGIC = b"\x7fELF"
_PT_NOTE = 4
_XEN_ELFNOTE_PHYS32_ENTRY = 18  # the PVH entry point QEMU needs to boot an ELF vmlinux


def _inflate_xz(data: bytes) -> bytes:
    return lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(data)


def _inflate_gzip(data: bytes) -> bytes:
    return zlib.decompressobj(wbits=31).decompress(data)


def _inflate_zstd(data: bytes) -> bytes:
    zstd = shutil.which("zstd")
    if zstd is None:
        return b""
    # Trailing bytes after the frame make zstd complain; what it wrote before that is the kernel.
    return subprocess.run([zstd, "-dcq"], input=data, capture_output=True, check=False).stdout


def extract_vmlinux(bzimage: bytes) -> bytes | None:
    """The uncompressed ELF kernel inside a bzImage (the method of the kernel's extract-vmlinux)."""
    for magic, inflate in (
        (_XZ_MAGIC, _inflate_xz),
        (_ZSTD_MAGIC, _inflate_zstd),
        (_GZIP_MAGIC, _inflate_gzip),
    ):
        start = bzimage.find(magic)
        while start >= 0:
            try:
                out = inflate(bzimage[start:])
            except (lzma.LZMAError, zlib.error):
                out = b""
            if out.startswith(_ELF_MAGIC):
                return out
            start = bzimage.find(magic, start + 1)
    return None


def has_pvh_note(elf: bytes) -> bool:
    """Whether a 64-bit ELF kernel carries the Xen PVH entry note (``CONFIG_PVH``)."""
    if not elf.startswith(_ELF_MAGIC) or elf[4] != 2:
        return False
    phoff = struct.unpack_from("<Q", elf, 0x20)[0]
    phentsize, phnum = struct.unpack_from("<HH", elf, 0x36)
    for i in range(phnum):
        p_type, _flags, p_offset, _vaddr, _paddr, p_filesz = struct.unpack_from(
            "<IIQQQQ", elf, phoff + i * phentsize
        )
        if p_type != _PT_NOTE:
            continue
        pos, end = p_offset, p_offset + p_filesz
        while pos + 12 <= end:
            namesz, descsz, n_type = struct.unpack_from("<III", elf, pos)
            name = elf[pos + 12 : pos + 12 + namesz].rstrip(b"\0")
            if name == b"Xen" and n_type == _XEN_ELFNOTE_PHYS32_ENTRY:
                return True
            pos += 12 + (namesz + 3) // 4 * 4 + (descsz + 3) // 4 * 4
    return False


def prepare_kernel_image(kernel: Kernel, directory: Path) -> Path:
    """An uncompressed vmlinux with a PVH note if one can be had (saves seconds of in-guest
    decompression under TCG), otherwise the bzImage itself."""
    vmlinux = extract_vmlinux(kernel.bzimage.read_bytes())
    if vmlinux is None or not has_pvh_note(vmlinux):
        return kernel.bzimage
    path = directory / f"vmlinux-{kernel.version}"
    path.write_bytes(vmlinux)
    return path


# ------------------------------------------------------------------------------------------ modules


def read_modules_dep(modules: Path) -> dict[str, list[str]]:
    """modules.dep as {relative path: [relative paths of its dependencies]}."""
    deps: dict[str, list[str]] = {}
    for line in (modules / "modules.dep").read_text().splitlines():
        module, sep, rest = line.partition(":")
        if sep:
            deps[module] = rest.split()
    return deps


def module_name(path: str) -> str:
    name = path.rsplit("/", 1)[-1]
    name = re.sub(r"\.ko(\.(xz|gz|zst))?$", "", name)
    return name.replace("-", "_")


def modules_in_load_order(modules: Path, wanted: Iterable[str]) -> list[str]:
    """Relative paths of ``wanted`` and all they depend on, every module after its dependencies."""
    deps = read_modules_dep(modules)
    by_name = {module_name(path): path for path in deps}
    order: list[str] = []
    visiting: set[str] = set()

    def visit(path: str) -> None:
        if path in order:
            return
        if path in visiting:
            raise GuestSetupError(f"dependency cycle at {path}")
        visiting.add(path)
        for dep in deps.get(path, []):
            visit(dep)
        visiting.discard(path)
        order.append(path)

    for name in wanted:
        path = by_name.get(name.replace("-", "_"))
        if path is None:
            raise GuestSetupError(f"kernel module {name} not in {modules}/modules.dep")
        visit(path)
    return order


def read_module(path: Path) -> bytes:
    """A module's ELF bytes, decompressed if Debian shipped it as .ko.xz/.ko.gz/.ko.zst."""
    data = path.read_bytes()
    if path.name.endswith(".xz"):
        return lzma.decompress(data)
    if path.name.endswith(".gz"):
        return zlib.decompress(data, wbits=31)
    if path.name.endswith(".zst"):
        return subprocess.run([which("zstd"), "-dcq"], input=data, capture_output=True, check=True).stdout
    return data


# ------------------------------------------------------------------------------------------- cpio


class Cpio:
    """A newc (SVR4, no CRC) archive, as the kernel unpacks into its initramfs."""

    def __init__(self) -> None:
        self._out = bytearray()
        self._ino = 1
        self.names: set[str] = set()

    def _entry(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)) -> None:
        name = name.lstrip("/")
        if name in self.names:
            return
        self.names.add(name)
        encoded = name.encode() + b"\0"
        fields = (self._ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(encoded), 0)
        self._ino += 1
        self._out += b"070701" + b"".join(b"%08X" % f for f in fields) + encoded
        self._pad()
        self._out += data
        self._pad()

    def _pad(self) -> None:
        self._out += b"\0" * (-len(self._out) % 4)

    def directory(self, name: str) -> None:
        parts = name.strip("/").split("/")
        for i in range(1, len(parts) + 1):
            self._entry("/".join(parts[:i]), stat.S_IFDIR | 0o755)

    def _parent(self, name: str) -> None:
        parent = name.strip("/").rpartition("/")[0]
        if parent:
            self.directory(parent)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self._parent(name)
        self._entry(name, stat.S_IFREG | mode, data)

    def symlink(self, name: str, target: str) -> None:
        self._parent(name)
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def char_device(self, name: str, major: int, minor: int) -> None:
        self._parent(name)
        self._entry(name, stat.S_IFCHR | 0o600, rdev=(major, minor))

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        return bytes(self._out)


# --------------------------------------------------------------------------------------- initramfs


def shared_libraries(binary: str) -> list[str]:
    """What ``ldd`` says a binary loads: library paths and the dynamic loader."""
    out = subprocess.run([which("ldd"), binary], capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise GuestSetupError(f"ldd {binary} failed: {out.stderr}{out.stdout}")
    paths = []
    for raw in out.stdout.splitlines():
        line = raw.strip()
        if "not found" in line:
            raise GuestSetupError(f"{binary}: {line}")
        if "=>" in line:
            target = line.split("=>", 1)[1].split()
            if target and target[0].startswith("/"):
                paths.append(target[0])
        elif line.startswith("/"):
            paths.append(line.split()[0])
    return paths


def is_static(binary: Path) -> bool:
    out = subprocess.run([which("ldd"), str(binary)], capture_output=True, text=True, check=False)
    return out.returncode != 0 or "not a dynamic executable" in out.stdout + out.stderr


INIT_SCRIPT = r"""#!/bin/busybox sh
# vblk end-to-end guest: format, write, drop caches, read back, report on the serial console.
/bin/busybox --install -s /bin
export PATH=/bin LD_LIBRARY_PATH=@LIBDIRS@
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
ln -s /proc/mounts /etc/mtab  # where resize2fs looks for what is mounted

report() { echo "@MARK@ $*"; sync; poweroff -f; sleep 5; }
fail() {
    echo "vblk-e2e: FAILED at: $* (uptime $(cut -d' ' -f1 /proc/uptime))"
    dmesg | tail -n 40
    report fail "$*"
}
step() { echo "vblk-e2e: $* (uptime $(cut -d' ' -f1 /proc/uptime))"; }

# vblk.mode=resize: ext4 mounted and written to while the host grows the disk under it; the
# kernel sees the new size, resize2fs grows the mounted file system online, writes go on.
resize_proof() {
    before=$(cat /sys/block/vda/size)
    /sbin/mke2fs -q -F -t ext4 -L vblk-e2e $dev || fail "mke2fs"
    mount -t ext4 $dev /mnt || fail "mount"
    mkdir -p /mnt/vblk /mnt/w || fail "mkdir"
    df_before=$(df -k /mnt | awk 'NR == 2 { print $2 }')
    echo 0 > /tmp/rounds
    (
        i=0
        while [ ! -e /tmp/stop ]; do
            k=$((i % 8))
            dd if=/payload.bin of=/mnt/w/$k bs=65536 skip=$((k * 16)) count=16 conv=fsync \
                2>/dev/null || exit 1
            i=$((i + 1))
            echo $i > /tmp/rounds
        done
    ) &
    writer=$!
    sleep 0.5
    ready=$(cat /tmp/rounds)
    echo "@RESIZE_READY@ sectors $before"
    i=0
    while [ "$(cat /sys/block/vda/size)" = "$before" ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i + 1)); done
    after=$(cat /sys/block/vda/size)
    [ "$after" != "$before" ] || fail "the disk's size never changed"
    step "resized: $before -> $after sectors, $(cat /tmp/rounds) write rounds"
    /sbin/resize2fs $dev || fail "resize2fs"
    grown=$(cat /tmp/rounds)
    df_after=$(df -k /mnt | awk 'NR == 2 { print $2 }')
    cp /payload.bin /mnt@PAYLOAD@ || fail "write after the resize"
    touch /tmp/stop
    wait $writer || fail "writes during the resize"
    for k in 0 1 2 3 4 5 6 7; do
        want=$(dd if=/payload.bin bs=65536 skip=$((k * 16)) count=16 2>/dev/null | sha256sum)
        got=$(sha256sum < /mnt/w/$k)
        [ "$want" = "$got" ] || fail "file w/$k reads back wrong"
    done
    sync
    rounds=$(cat /tmp/rounds)
    echo "vblk-e2e: resize sectors $before $after df-k $df_before $df_after rounds $ready $grown $rounds"
    umount /mnt || fail "umount"
    /sbin/e2fsck -fn $dev || fail "e2fsck"
    echo 3 > /proc/sys/vm/drop_caches
    mount -t ext4 -o ro $dev /mnt || fail "remount"
    sha=$(sha256sum /mnt@PAYLOAD@ | cut -d' ' -f1)
    umount /mnt || fail "umount after read"
    report ok "$sha"
}

# Module parameters from the kernel command line (virtio_pci.force_legacy=1), as modprobe does.
for m in @MODULES@; do
    opts=""
    for arg in $(cat /proc/cmdline); do
        case "$arg" in "$m".*=*) opts="$opts ${arg#"$m".}" ;; esac
    done
    insmod "/lib/modules/$m.ko" $opts || fail "insmod $m$opts"
done

mode=nbd
stress=0
for arg in $(cat /proc/cmdline); do
    case "$arg" in
    vblk.mode=*) mode="${arg#vblk.mode=}" ;;
    vblk.stress=*) stress="${arg#vblk.stress=}" ;;
    esac
done
step "modules loaded, mode $mode"

case "$mode" in
nbd)
    dev=/dev/nbd0
    ip link set lo up
    ip addr add @GUEST_IP@/24 dev eth0 || fail "ip addr"
    ip link set eth0 up || fail "ip link"
    /sbin/nbd-client -N disk0 @NBD_IP@ @NBD_PORT@ $dev || fail "nbd-client connect"
    ;;
vda | resize)
    dev=/dev/vda
    i=0
    while [ ! -b $dev ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
    [ -b $dev ] || fail "no $dev"
    ;;
*)
    fail "unknown mode $mode"
    ;;
esac
step "disk $dev: $(cat /sys/block/${dev#/dev/}/size) sectors"
if [ "$mode" = vda ]; then
    # One character per feature bit, bit 0 first: bit 32 is VIRTIO_F_VERSION_1.
    echo "vblk-e2e: virtio features $(cat /sys/block/vda/device/features)"
fi
[ "$mode" = resize ] && resize_proof

fs_size=""
[ "$stress" -gt 0 ] && fs_size=@FS_MIB@M  # leave a scratch area after the file system
/sbin/mke2fs -q -F -t ext4 -L vblk-e2e $dev $fs_size || fail "mke2fs"
mount -t ext4 $dev /mnt || fail "mount"
mkdir -p /mnt/vblk || fail "mkdir"
cp /payload.bin /mnt@PAYLOAD@ || fail "write"
sync
umount /mnt || fail "umount"
step "written"

echo 3 > /proc/sys/vm/drop_caches
mount -t ext4 $dev /mnt || fail "remount"
sha=$(sha256sum /mnt@PAYLOAD@ | cut -d' ' -f1)
[ -n "$sha" ] || fail "read back"
umount /mnt || fail "umount after read"
step "read back"
/sbin/e2fsck -fn $dev || fail "e2fsck"
step "checked"

# Many requests in flight at once: four processes, each writing 1 MiB of its own 4 MiB of the scratch
# area in 4 KiB O_DIRECT requests and reading it back, for $stress rounds.
round=0
while [ "$round" -lt "$stress" ]; do
    pids=""
    for p in 0 1 2 3; do
        (
            seek=$((@FS_MIB@ * 256 + p * 1024))
            skip=$(((round + p) % 2 * 1024))
            dd if=/payload.bin of=$dev bs=4096 count=256 skip=$skip seek=$seek oflag=direct \
                conv=notrunc 2>/dev/null || exit 1
            want=$(dd if=/payload.bin bs=4096 count=256 skip=$skip 2>/dev/null | sha256sum)
            got=$(dd if=$dev bs=4096 count=256 skip=$seek iflag=direct 2>/dev/null | sha256sum)
            [ "$want" = "$got" ]
        ) &
        pids="$pids $!"
    done
    for pid in $pids; do
        wait "$pid" || fail "stress round $round"
    done
    round=$((round + 1))
done
[ "$stress" -gt 0 ] && step "stress: $stress rounds of 4 x 512 direct requests"

if [ "$mode" = nbd ]; then
    /sbin/nbd-client -d $dev || fail "nbd-client disconnect"
fi
report ok "$sha"
"""


def build_initramfs(kernel: Kernel, payload: bytes) -> bytes:
    """The guest's root: busybox, nbd-client and mke2fs with their libraries, the modules, /init."""
    check_host_tools()
    cpio = Cpio()
    for d in ("bin", "sbin", "dev", "proc", "sys", "mnt", "tmp", "etc", "lib/modules"):
        cpio.directory(d)
    cpio.char_device("dev/console", 5, 1)
    cpio.char_device("dev/null", 1, 3)

    if not is_static(BUSYBOX):
        raise GuestSetupError(f"{BUSYBOX} is not static: install Debian package busybox-static")
    cpio.file("bin/busybox", BUSYBOX.read_bytes(), 0o755)
    cpio.symlink("bin/sh", "busybox")

    libdirs: list[str] = []
    for guest_path, tool in GUEST_BINARIES.items():
        host_path = which(tool)
        cpio.file(guest_path, Path(host_path).read_bytes(), 0o755)
        for lib in shared_libraries(host_path):
            cpio.file(lib, Path(lib).resolve().read_bytes(), 0o755)
            libdir = lib.rpartition("/")[0]
            if libdir not in libdirs:
                libdirs.append(libdir)
    mke2fs_conf = Path("/etc/mke2fs.conf")
    if mke2fs_conf.is_file():
        cpio.file("etc/mke2fs.conf", mke2fs_conf.read_bytes())

    names = []
    for rel in modules_in_load_order(kernel.modules, GUEST_MODULES):
        name = module_name(rel)
        cpio.file(f"lib/modules/{name}.ko", read_module(kernel.modules / rel))
        names.append(name)

    cpio.file("payload.bin", payload)
    init = (
        INIT_SCRIPT.replace("@MARK@", RESULT_MARK)
        .replace("@LIBDIRS@", ":".join(libdirs))
        .replace("@MODULES@", " ".join(names))
        .replace("@GUEST_IP@", GUEST_IP)
        .replace("@NBD_IP@", NBD_FORWARD_IP)
        .replace("@NBD_PORT@", str(NBD_PORT))
        .replace("@PAYLOAD@", PAYLOAD_PATH)
        .replace("@FS_MIB@", str(STRESS_FS_MIB))
        .replace("@RESIZE_READY@", RESIZE_READY)
    )
    cpio.file("init", init.encode(), 0o755)
    return cpio.finish()


# -------------------------------------------------------------------------------------------- boot


@dataclasses.dataclass(frozen=True, slots=True)
class Guest:
    """A bootable guest: kernel image (vmlinux or bzImage), the bzImage to fall back to, initramfs."""

    kernel: Path
    bzimage: Path
    initrd: Path


@dataclasses.dataclass(slots=True)
class Boot:
    returncode: int | None  # None: killed at the timeout
    seconds: float
    serial: str
    stderr: str
    kernel: Path

    def result(self) -> list[str] | None:
        for raw in self.serial.splitlines():
            line = raw.strip("\r\n\0 ")  # serial lines end in \r\n
            if line.startswith(RESULT_MARK + " "):
                return line.split()[1:]
        return None

    def describe(self) -> str:
        return (
            f"qemu ({self.kernel.name}) exited {self.returncode} after {self.seconds:.1f}s\n"
            f"--- stderr ---\n{self.stderr}\n--- serial console ---\n{self.serial.replace(chr(13), '')}"
        )


async def _run_qemu(argv: Sequence[str], serial_log: Path, timeout: float, kernel: Path) -> Boot:
    serial_log.unlink(missing_ok=True)
    started = time.monotonic()
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        start_new_session=True,  # qemu and its guestfwd socat: one process group to kill
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout)
        returncode: int | None = proc.returncode
    except TimeoutError:
        out, returncode = b"", None
    finally:
        if proc.returncode is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            await proc.wait()
        else:
            try:  # a socat that outlived qemu
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    seconds = time.monotonic() - started
    serial = serial_log.read_text(errors="replace") if serial_log.exists() else ""
    return Boot(returncode, seconds, serial, out.decode(errors="replace"), kernel)


async def boot(
    guest: Guest,
    *,
    serial_log: Path,
    mode: str,
    qemu_args: Sequence[str],
    timeout: float = 120,
    append: str = "",
    smp: int = 1,
) -> Boot:
    """Boot the guest once (falling back to the bzImage if QEMU refuses the vmlinux)."""
    qemu = which("qemu-system-x86_64")
    kernels = [guest.kernel] if guest.kernel == guest.bzimage else [guest.kernel, guest.bzimage]
    for kernel in kernels:
        argv = [
            qemu,
            "-accel",
            "tcg",
            "-cpu",
            "max",
            "-m",
            str(GUEST_RAM_MIB),
            "-smp",
            str(smp),
            "-nodefaults",
            "-display",
            "none",
            "-no-reboot",
            "-serial",
            f"file:{serial_log}",
            "-kernel",
            str(kernel),
            "-initrd",
            str(guest.initrd),
            "-append",
            f"console=ttyS0 quiet panic=-1 vblk.mode={mode} {append}".strip(),
            *qemu_args,
        ]
        result = await _run_qemu(argv, serial_log, timeout, kernel)
        refused = result.returncode not in (0, None) and not result.serial
        if refused and kernel != guest.bzimage:
            # QEMU would not load the ELF vmlinux ("... without PVH ELF Note", "Error while
            # loading elf kernel"): boot the bzImage, which every QEMU can.
            continue
        return result
    return result


def nbd_forward_args(port: int) -> list[str]:
    """User-mode networking that lets the guest reach only vblk (on the host's loopback)."""
    forward = f"tcp:{NBD_FORWARD_IP}:{NBD_PORT}-cmd:{which('socat')} STDIO TCP:127.0.0.1:{port}"
    return [
        "-netdev",
        f"user,id=n0,restrict=on,guestfwd={forward}",
        "-device",
        "virtio-net-pci,netdev=n0",
    ]


def nbd_drive_args(port: int, export: str = "disk0") -> list[str]:
    """QEMU's own NBD client as the guest's virtio-blk disk."""
    return ["-drive", f"file=nbd://127.0.0.1:{port}/{export},format=raw,if=virtio"]


def vhost_user_blk_args(
    socket_path: Path,
    *,
    device: str = "vhost-user-blk-pci",
    queues: int = 1,
    packed: bool = False,
    event_idx: bool = True,
    reconnect: int | None = None,
) -> list[str]:
    """A vhost-user-blk disk served on ``socket_path``: guest RAM must be a shared memfd.
    ``packed`` offers VIRTIO_F_RING_PACKED to the guest, ``reconnect`` (seconds) makes QEMU
    reconnect to a back end that went away."""
    chardev = f"socket,id=vu0,path={socket_path}"
    if reconnect is not None:
        chardev += f",reconnect={reconnect}"
    options = f"{device},chardev=vu0,num-queues={queues}"
    if packed:
        options += ",packed=on"
    if not event_idx:
        options += ",event_idx=off"
    return [
        "-object",
        f"memory-backend-memfd,id=mem,size={GUEST_RAM_MIB}M,share=on",
        "-numa",
        "node,memdev=mem",
        "-chardev",
        chardev,
        "-device",
        options,
    ]


def virtio_features(boot: Boot) -> str | None:
    """The guest's negotiated virtio feature bits of /dev/vda (bit 0 first), from the console."""
    for raw in boot.serial.splitlines():
        line = raw.strip("\r\n\0 ")
        if line.startswith("vblk-e2e: virtio features "):
            return line.rsplit(" ", 1)[1]
    return None


async def check_ext4_image(image: Path, payload_sha256: str, context: str) -> None:
    """The host's view of a disk the guest wrote: ``e2fsck -fn`` is clean and the payload file
    reads back (with debugfs, no mount) with the guest's checksum. ``context`` goes into failures."""
    fsck = await asyncio.create_subprocess_exec(
        which("e2fsck"), "-fn", str(image), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    fsck_out, _ = await asyncio.wait_for(fsck.communicate(), 60)
    assert fsck.returncode == 0, f"e2fsck -fn exited {fsck.returncode}:\n{fsck_out.decode()}\n{context}"
    debugfs = await asyncio.create_subprocess_exec(
        which("debugfs"),
        "-R",
        f"cat {PAYLOAD_PATH}",
        str(image),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    data, err = await asyncio.wait_for(debugfs.communicate(), 60)
    assert debugfs.returncode == 0, err.decode()
    got = hashlib.sha256(data).hexdigest()
    assert got == payload_sha256, f"debugfs read {len(data)} bytes with another checksum: {err.decode()}"


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m tests.e2e.linux DIR``: build the guest the e2e tests boot, for runs by hand."""
    parser = argparse.ArgumentParser(prog="python -m tests.e2e.linux", description=main.__doc__)
    parser.add_argument("directory", type=Path, help="where to put the kernel image and initramfs")
    directory = parser.parse_args(argv).directory
    directory.mkdir(parents=True, exist_ok=True)
    kernel = find_kernel()
    payload = os.urandom(8 << 20)
    initrd = directory / "initramfs.cpio"
    initrd.write_bytes(build_initramfs(kernel, payload))
    image = prepare_kernel_image(kernel, directory)
    print(f"kernel  {image}\ninitrd  {initrd}\npayload sha256 {hashlib.sha256(payload).hexdigest()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
