#!/usr/bin/env bash
# Sets up the emulated CPU classes that bench/cpu_classes.py measures on, in $EMU (default ~/.cache/compressor-emu):
# qemu-user 10 from bookworm-backports, an x86 venv, and an arm64 Debian rootfs with onnxruntime.
# Idempotent; ~8 min, most of it debootstrap. Needs root, Debian bookworm, deb.debian.org and PyPI.
HERE=$(cd "$(dirname "$0")" && pwd)
set -euo pipefail
EMU=${EMU:-${XDG_CACHE_HOME:-$HOME/.cache}/compressor-emu}; ORT=${ORT:-1.31.1}
mkdir -p $EMU/src
cp -f "$HERE/run_as.sh" $EMU/run_as.sh; cp -f "$HERE/satcheck.py" "$HERE/cpuid.c" $EMU/src/

# 1. qemu 10.0.2 (bookworm-backports) -- bookworm's own 7.2 segfaults importing onnxruntime under qemu-aarch64
if [ ! -f /etc/apt/sources.list.d/backports.sources ]; then
    printf 'Types: deb\nURIs: http://deb.debian.org/debian\nSuites: bookworm-backports\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' \
        > /etc/apt/sources.list.d/backports.sources
fi
if ! /usr/bin/qemu-x86_64-static --version 2>/dev/null | grep -q 'version 10'; then
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q -t bookworm-backports qemu-user-static
fi
command -v debootstrap >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -q debootstrap
command -v gcc >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -q gcc libc6-dev

# 2. binfmt_misc for aarch64 (kernel-global; needed by chroot/debootstrap and by aarch64 child processes)
mountpoint -q /proc/sys/fs/binfmt_misc || mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
[ -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ] || cat /usr/lib/binfmt.d/qemu-aarch64.conf > /proc/sys/fs/binfmt_misc/register

# 3. x86 venv
[ -x $EMU/venv/bin/python ] || python3 -m venv $EMU/venv
$EMU/venv/bin/python -c "import onnxruntime as o; assert o.__version__ == '$ORT'" 2>/dev/null \
    || $EMU/venv/bin/pip install -q numpy onnx onnxruntime==$ORT

# 4. cpuid probe
[ -x $EMU/src/cpuid ] || gcc -O2 -static -o $EMU/src/cpuid $EMU/src/cpuid.c

# 5. arm64 rootfs (Debian bookworm, Python 3.11.2) + venv with the aarch64 wheels
R=$EMU/arm64
if [ ! -x $R/usr/bin/python3 ]; then
    debootstrap --arch=arm64 --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates \
        bookworm $R http://deb.debian.org/debian
fi
mkdir -p $R/opt/wheels
# download on the host (the host's pip has the right proxy CA / mirrors; pip inside the chroot does not)
$EMU/venv/bin/pip download -q --only-binary=:all: --platform manylinux_2_28_aarch64 --platform manylinux2014_aarch64 \
    --platform manylinux_2_17_aarch64 --python-version 3.11 --implementation cp --abi cp311 \
    -d $R/opt/wheels numpy onnx onnxruntime==$ORT
install -m 755 /usr/bin/qemu-aarch64-static $R/usr/local/bin/qemu-aarch64-static
unshare --mount --propagation private -- bash -c "
    set -e; mount -t proc proc $R/proc; mount --rbind /dev $R/dev; mount --rbind /sys $R/sys
    chroot $R /opt/venv/bin/python -c \"import onnxruntime as o; assert o.__version__ == '$ORT'\" 2>/dev/null && exit 0
    chroot $R env -i PATH=/usr/bin:/bin HOME=/root sh -c \"[ -x /opt/venv/bin/python ] || python3 -m venv /opt/venv; /opt/venv/bin/pip install -q --disable-pip-version-check --no-index --find-links /opt/wheels numpy onnx onnxruntime==$ORT\"
"
echo "setup done: $($EMU/run_as.sh native $EMU/src/satcheck.py | head -c 200)"
