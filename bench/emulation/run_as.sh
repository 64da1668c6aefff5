#!/usr/bin/env bash
# run_as.sh CLASS SCRIPT.py [ARGS...]
#
# Runs a Python script so that onnxruntime's MLAS int8 kernels of CPU class CLASS are used.
# (bench/emulation/setup.sh installs what it needs into $EMU, default ~/.cache/compressor-emu.)
#
#   native | avx512vnni  host CPU, no emulation (x86 AVX512-VNNI kernels: exact int32)
#   avx2                 qemu-x86_64 -cpu Haswell-noTSX  (AVX2+FMA, no AVX-512/VNNI: vpmaddubsw, saturates)
#   avx2-max             qemu-x86_64 -cpu max            (same int8 class; TCG "max" = AVX2, vendor AuthenticAMD)
#   sse41                qemu-x86_64 -cpu Nehalem         (SSE4.2, no AVX: SSE int8 kernel, exact int32)
#   arm64 | arm64-neon   qemu-aarch64 -cpu cortex-a72    (NEON smull/smlal/sadalp kernel)
#   arm64-dotprod        qemu-aarch64 -cpu neoverse-n1   (udot kernel)
#   arm64-i8mm           qemu-aarch64 -cpu neoverse-v1   (SVE-256 + i8mm: SVE ummla kernel)
#   arm64-i8mm-neon      qemu-aarch64 -cpu max,sve=off,sme=off (NEON ummla kernel)
#   arm64-n2             qemu-aarch64 -cpu neoverse-n2   (SVE-128 + i8mm: SVE ummla kernel)
#   avxvnni | avx512 | amx   NOT available: qemu TCG (7.2 and 10.0) implements neither AVX-VNNI nor AVX-512/AMX.
#
# Env:
#   PY        x86 python to use (any x86_64 venv's python), default $EMU/venv/bin/python
#   ARM_PY    python inside the arm64 rootfs, default /opt/venv/bin/python (numpy, onnx, onnxruntime 1.31.1)
#   ARM_ROOT  arm64 rootfs, default $EMU/arm64
#   QEMU_X86  qemu-x86_64 binary, default /usr/bin/qemu-x86_64-static (10.0.2 from bookworm-backports)
#   ARM_PYTHONPATH  PYTHONPATH for the arm64 python (the host's PYTHONPATH is dropped there: x86 extensions)
#   COMPRESSOR_CPU_CLASS  exported with the class name the project uses, unless already set
#
# Pitfalls: under qemu-x86_64, a process started by exec (subprocess, multiprocessing "spawn"/"forkserver")
# runs NATIVELY (x86 binaries need no binfmt); only fork()ed children stay emulated. For arm64, children stay
# emulated through binfmt_misc and inherit QEMU_CPU. Under qemu-x86_64 /proc/cpuinfo is the HOST's.
set -euo pipefail

usage() { sed -n '2,30p' "$0" >&2; exit 2; }
[ $# -ge 2 ] || usage
CLASS=$1; shift
SCRIPT=$1; shift

EMU=${EMU:-${XDG_CACHE_HOME:-$HOME/.cache}/compressor-emu}
# the checkout's parent (the checkout and ../shared): bind-mounted at the same path inside the arm64 rootfs
SHARE=$(cd "$(dirname "$0")/../../.." && pwd)
PY=${PY:-$EMU/venv/bin/python}
ARM_PY=${ARM_PY:-/opt/venv/bin/python}
ARM_ROOT=${ARM_ROOT:-$EMU/arm64}
QEMU_X86=${QEMU_X86:-/usr/bin/qemu-x86_64-static}
QEMU_ARM=/usr/bin/qemu-aarch64-static

x86_qemu() {  # $1 = qemu -cpu string, $2 = project class name, rest = script args
    local cpu=$1 cls=$2; shift 2
    [ -x "$QEMU_X86" ] || { echo "run_as.sh: $QEMU_X86 missing (run $EMU/setup.sh)" >&2; exit 3; }
    export COMPRESSOR_CPU_CLASS=${COMPRESSOR_CPU_CLASS:-$cls}
    exec "$QEMU_X86" -cpu "$cpu" "$PY" "$SCRIPT" "$@"
}

arm_qemu() {  # $1 = qemu -cpu string, $2 = project class name, rest = script args
    local cpu=$1 cls=$2; shift 2
    [ -x "$ARM_ROOT$ARM_PY" ] || [ -L "$ARM_ROOT$ARM_PY" ] || { echo "run_as.sh: $ARM_ROOT$ARM_PY missing (run $EMU/setup.sh)" >&2; exit 3; }
    [ -x "$QEMU_ARM" ] || { echo "run_as.sh: $QEMU_ARM missing (run $EMU/setup.sh)" >&2; exit 3; }
    # binfmt_misc (global, kernel-level) so that aarch64 children (subprocess, spawn) also run under qemu
    if [ ! -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ]; then
        mountpoint -q /proc/sys/fs/binfmt_misc || mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
        cat /usr/lib/binfmt.d/qemu-aarch64.conf > /proc/sys/fs/binfmt_misc/register
    fi
    install -m 755 "$QEMU_ARM" "$ARM_ROOT/usr/local/bin/qemu-aarch64-static"
    local abs; abs=$(readlink -f "$SCRIPT")
    case "$abs" in "$SHARE"/*|/tmp/*) ;; *) echo "run_as.sh: arm64 script must live under $SHARE or /tmp (bind-mounted): $abs" >&2; exit 3;; esac
    local cwd=$PWD; case "$cwd" in "$SHARE"/*|"$SHARE"|/tmp/*|/tmp) ;; *) cwd=/;; esac
    export COMPRESSOR_CPU_CLASS=${COMPRESSOR_CPU_CLASS:-$cls}
    export QEMU_CPU=$cpu
    # private mount namespace: proc/sys/dev and the $SHARE and /tmp bind mounts vanish when the run ends
    exec unshare --mount --propagation private -- /bin/bash -c '
        set -e; R=$1; S=$2; shift 2
        mount -t proc proc "$R/proc"; mount --rbind /sys "$R/sys"; mount --rbind /dev "$R/dev"
        mkdir -p "$R$S"; mount --bind "$S" "$R$S"; mount --bind /tmp "$R/tmp"
        cp -f /etc/resolv.conf "$R/etc/resolv.conf" 2>/dev/null || true
        cwd=$1; shift
        exec chroot "$R" /usr/bin/env -u PYTHONPATH -u PYTHONHOME -u VIRTUAL_ENV -u LD_LIBRARY_PATH -u LD_PRELOAD \
            PATH=/opt/venv/bin:/usr/local/bin:/usr/bin:/bin HOME=/root ${ARM_PYTHONPATH:+PYTHONPATH=$ARM_PYTHONPATH} \
            /bin/sh -c '"'"'cd "$1"; shift; exec /usr/local/bin/qemu-aarch64-static -cpu "$QEMU_CPU" "$@"'"'"' sh "$cwd" "$@"
    ' bash "$ARM_ROOT" "$SHARE" "$cwd" "$ARM_PY" "$abs" "$@"
}

case "$CLASS" in
    native) exec "$PY" "$SCRIPT" "$@" ;;
    avx512vnni|x86-avx512vnni)
        if ! grep -qw avx512_vnni /proc/cpuinfo; then
            echo "run_as.sh: this host has no AVX512-VNNI, and qemu cannot emulate it" >&2; exit 4
        fi
        export COMPRESSOR_CPU_CLASS=${COMPRESSOR_CPU_CLASS:-x86-avx512vnni}
        exec "$PY" "$SCRIPT" "$@" ;;
    avx2|x86-avx2)         x86_qemu Haswell-noTSX x86-avx2 "$@" ;;
    avx2-max)              x86_qemu max x86-avx2 "$@" ;;
    sse41|x86-sse)         x86_qemu Nehalem x86-sse "$@" ;;
    arm64|arm64-neon)      arm_qemu cortex-a72 arm64 "$@" ;;
    arm64-dotprod)         arm_qemu neoverse-n1 arm64-dotprod "$@" ;;
    arm64-i8mm)            arm_qemu neoverse-v1 arm64-i8mm "$@" ;;
    arm64-i8mm-neon)       arm_qemu max,sve=off,sme=off arm64-i8mm "$@" ;;
    arm64-n2)              arm_qemu neoverse-n2 arm64-i8mm "$@" ;;
    avxvnni|x86-avxvnni|avx512|x86-avx512|amx|x86-amx)
        echo "run_as.sh: class '$CLASS' cannot be emulated here: qemu TCG (7.2, 10.0.2) has no AVX-VNNI/AVX-512/AMX," \
             "and Intel SDE is not obtainable from PyPI/Debian/npm" >&2; exit 5 ;;
    *) echo "run_as.sh: unknown class '$CLASS'" >&2; usage ;;
esac
