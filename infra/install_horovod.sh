#!/usr/bin/env bash
# Install Horovod 0.28.1 (PyTorch + Gloo, CPU) into the given Python environment.
#
# Why a script: the last Horovod release (0.28.1) sets CMAKE_CXX_STANDARD 14, and torch>=2.1
# headers require C++17 (horovod#3996, fixed by PR #3998 after the release). We build the PyPI
# sdist with the standard patched to 17, cache the wheel outside the repository keyed by the
# torch and Python versions it was built against, and refuse to finish unless
# `horovodrun --check-build` reports both PyTorch and Gloo.
#
# usage: infra/install_horovod.sh [PYTHON]        (default: .venv/bin/python)
# env:   RINGFLOW_WHEEL_CACHE (default ~/.cache/ringflow/wheels), HOROVOD_VERSION (default 0.28.1)
set -euo pipefail

PY=$(realpath -s "${1:-.venv/bin/python}")   # absolute: the build runs in another directory
HOROVOD_VERSION=${HOROVOD_VERSION:-0.28.1}
BIN=$(dirname "$PY")

log() { printf '[install_horovod] %s\n' "$*" >&2; }
die() { printf '[install_horovod] ERROR: %s\n' "$*" >&2; exit 1; }

check_build() {
    local out
    out=$("$BIN/horovodrun" --check-build 2>&1) || return 1
    grep -Eq '\[X\] PyTorch' <<<"$out" && grep -Eq '\[X\] Gloo' <<<"$out"
}

torch_version=$("$PY" -c 'import torch; print(torch.__version__)') \
    || die "torch is not importable from $PY; install the project first (pip install -e .)"
py_tag=$("$PY" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')

if "$PY" -c "import horovod.torch" 2>/dev/null && check_build; then
    log "horovod already installed and built with PyTorch + Gloo"
    exit 0
fi

cache=${RINGFLOW_WHEEL_CACHE:-$HOME/.cache/ringflow/wheels}/horovod-${HOROVOD_VERSION}-torch${torch_version}-${py_tag}
wheel=$(ls "$cache"/horovod-"$HOROVOD_VERSION"-*.whl 2>/dev/null | head -n1 || true)

if [[ -z "$wheel" ]]; then
    log "no cached wheel in $cache: building horovod $HOROVOD_VERSION from the PyPI sdist (about 3 minutes)"
    "$PY" -m pip install --quiet "setuptools>=65" wheel packaging "cmake>=3.13,<4"
    work=$(mktemp -d)
    trap 'rm -rf "$work"' EXIT
    "$PY" -m pip download --quiet --no-deps --no-binary :all: "horovod==$HOROVOD_VERSION" -d "$work"
    tar xzf "$work/horovod-$HOROVOD_VERSION.tar.gz" -C "$work"
    src="$work/horovod-$HOROVOD_VERSION"
    for f in "$src/CMakeLists.txt" "$src/horovod/torch/CMakeLists.txt"; do
        grep -q 'set(CMAKE_CXX_STANDARD 14)' "$f" || die "expected 'set(CMAKE_CXX_STANDARD 14)' in $f: sdist changed?"
        sed -i 's/set(CMAKE_CXX_STANDARD 14)/set(CMAKE_CXX_STANDARD 17)/' "$f"
    done
    mkdir -p "$cache"
    # CMake 4 rejects the bundled gloo/flatbuffers; use the 3.x from the venv.
    HOROVOD_CMAKE="$BIN/cmake" \
    HOROVOD_WITH_PYTORCH=1 HOROVOD_WITH_GLOO=1 HOROVOD_WITHOUT_MPI=1 \
    HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_MXNET=1 HOROVOD_CPU_OPERATIONS=GLOO \
    MAKEFLAGS="-j$(nproc)" \
        "$PY" -m pip wheel --no-build-isolation --no-deps --no-cache-dir -w "$work/dist" "$src" \
        || die "horovod build failed (see the compiler output above)"
    built=$(ls "$work"/dist/horovod-*.whl)
    # atomic: a half-copied wheel must never look like a cached one
    cp "$built" "$cache/.tmp.whl" && mv "$cache/.tmp.whl" "$cache/$(basename "$built")"
    wheel="$cache/$(basename "$built")"
    log "cached $wheel"
else
    log "using cached wheel $wheel"
fi

"$PY" -m pip install --quiet --force-reinstall --no-deps "$wheel"
# horovod's runtime dependencies (cloudpickle, psutil, pyyaml, packaging) come with the project.
check_build || { "$BIN/horovodrun" --check-build >&2 || true; die "horovodrun --check-build does not list PyTorch and Gloo"; }
log "horovod $HOROVOD_VERSION ready: $("$BIN/horovodrun" --check-build | grep -E '\[X\] (PyTorch|Gloo)' | tr -s ' ' | paste -sd ' ')"
