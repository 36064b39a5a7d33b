#!/usr/bin/env bash
# Installs Debian packages vblk is used and tested with: `client` the clients the README's
# walk-through uses (nbdinfo, nbdcopy, nbdsh, qemu-img, curl, xxd), `all` (the default) every
# client and server the test suite talks to.
# As root it installs what is missing; otherwise it says what a root user must install.
set -euo pipefail
group="${1:-all}"
# setup.py compiles the request path with mypyc: a C compiler and Python's headers.
packages=(gcc libc6-dev python3-dev)
# The walk-through's clients.
packages+=(libnbd-bin qemu-utils curl xxd)
if [ "$group" != client ]; then
packages+=(libnbd-bin python3-libnbd nbdkit nbdkit-plugin-python qemu-utils fio prometheus chromium curl systemd python3-yaml)
# tests/e2e: Debian's kernel under QEMU (TCG) with a busybox initramfs, formatting vblk disks.
packages+=(qemu-system-x86 qemu-system-common linux-image-amd64 busybox-static nbd-client e2fsprogs socat)
# TLS tests make their certificates with the openssl command.
packages+=(openssl)
# tests/ceph: a throwaway Ceph cluster (mon + memstore OSD, rbd tool); bench: qemu-nbd's rbd driver.
packages+=(ceph-mon ceph-osd ceph-common python3-rbd python3-rados qemu-block-extra)
# vblk serve preloads tcmalloc when it serves an RBD disk (--malloc auto).
packages+=(libtcmalloc-minimal4)
fi
missing=()
for p in "${packages[@]}"; do
    dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "install-tools: not root; please install: ${missing[*]}" >&2
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
echo "install-tools: installed ${missing[*]}"
