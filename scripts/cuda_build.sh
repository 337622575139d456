#!/usr/bin/env bash
# Builds mirror-sd with `--features cuda` on a machine without CUDA or a GPU, and checks that the
# CUDA-featured build still passes the CPU tests. Neither the default build nor the tests need it.
#
#   scripts/cuda_build.sh            # setup + build + check (the whole thing)
#   scripts/cuda_build.sh setup      # NVIDIA's CUDA 13.0 toolchain and libraries from PyPI into .cuda/
#   scripts/cuda_build.sh build      # cargo build --release --features cuda (lib, examples, tests)
#   scripts/cuda_build.sh check      # cargo test --release --workspace --features cuda (CPU tests)
#   scripts/cuda_build.sh device     # the stripped device binary for scripts/cuda_device.sh in .device/
#   scripts/cuda_build.sh env        # print the environment the steps use (eval "$(... env)")
#
# How the link works without CUDA installed:
# - nvcc, its headers and cicc come as PyPI wheels (nvidia-cuda-nvcc, -crt, -cccl, nvidia-nvvm),
#   pinned to CUDA 13.0, the version of the lent GPU machine's driver (a newer nvcc can emit PTX
#   that an older driver rejects).
# - candle 0.11.1 turns on cudarc's `dynamic-linking`, so the binaries are linked against
#   libcuda, libnvrtc, libcurand, libcublas and libcublasLt, and candle-kernels adds libcudart.
#   The last five are the real cu13 libraries from NVIDIA's wheels (nvidia-cuda-nvrtc,
#   nvidia-curand, nvidia-cublas, nvidia-cuda-runtime); the wheels ship only the versioned names
#   (libcublas.so.13), so lib/stubs beside them holds `libX.so -> ../libX.so.N` links for the
#   linker; cudarc's build script searches $CUDA_ROOT/lib/stubs, so no RUSTFLAGS are needed
#   (and the default build's artifacts stay valid when both share a target directory).
# - libcuda comes with the GPU driver, never in a wheel. .cuda/link/libcuda.so is a stub built
#   here (lib/stubs/libcuda.so) with soname libcuda.so.1: one function per driver entry point that cudarc 0.19.10
#   declares, each returning CUDA_ERROR_STUB_LIBRARY (34). The binaries record `libcuda.so.1`
#   and get the real driver on a GPU machine. Here the stub (.cuda/stub-runtime/libcuda.so.1)
#   lets the test binaries start: a CUDA device cannot be created, so GPU tests skip.
#   (cudarc's run-time `dynamic-loading` would avoid the stub, but candle enables
#   `dynamic-linking` and cudarc refuses both at once.)
#
# Variables: MIRROR_CUDA_DIR (default .cuda), CUDA_COMPUTE_CAP (default 90: H100/H200),
# CARGO_TARGET_DIR (default target/cuda, so the default build's target/ is left alone).
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
CUDA_DIR="${MIRROR_CUDA_DIR:-$ROOT/.cuda}"
PY="$CUDA_DIR/py"
CU13="$PY/nvidia/cu13"
LINK="$CU13/lib/stubs"
STUB_RUNTIME="$CUDA_DIR/stub-runtime"
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target/cuda}"

# CUDA 13.0 (the driver of the lent machine is 580, CUDA 13.0).
TOOLCHAIN_WHEELS=(
  nvidia-cuda-nvcc==13.0.88
  nvidia-cuda-crt==13.0.88
  nvidia-cuda-runtime==13.0.96
  nvidia-cuda-cccl==13.0.85
  nvidia-nvvm==13.0.88
)
LIBRARY_WHEELS=(
  nvidia-cuda-nvrtc==13.0.88
  nvidia-curand==10.4.0.35
  nvidia-cublas==13.0.0.19
)

log() { printf '\n== %s\n' "$*" >&2; }

setup() {
  mkdir -p "$CUDA_DIR"
  if [[ ! -x "$CU13/bin/nvcc" || ! -e "$CU13/lib/libcublas.so.13" ]]; then
    log "installing CUDA 13.0 wheels into $PY (about 1.2 GB unpacked)"
    python3 -m pip install --quiet --disable-pip-version-check --no-deps --no-compile \
      --upgrade --target "$PY" "${TOOLCHAIN_WHEELS[@]}" "${LIBRARY_WHEELS[@]}"
  fi
  # nvcc looks for cicc in ../nvvm/bin; nvidia-nvvm installs nvvm/ elsewhere in the tree.
  if [[ ! -e "$CU13/nvvm/bin/cicc" ]]; then
    local cicc
    cicc="$(find "$PY" -path '*/nvvm/bin/cicc' -print -quit)"
    [[ -n "$cicc" ]] || { echo "nvidia-nvvm did not install nvvm/bin/cicc" >&2; exit 1; }
    ln -sfn "$(dirname "$(dirname "$cicc")")" "$CU13/nvvm"
  fi
  "$CU13/bin/nvcc" --version | grep -q 'release 13.0' \
    || { echo "expected nvcc 13.0 in $CU13/bin" >&2; exit 1; }

  log "linker directory $LINK"
  mkdir -p "$LINK" "$STUB_RUNTIME"
  local lib name
  for lib in cudart nvrtc curand cublas cublasLt; do
    name="$(cd "$CU13/lib" && ls "lib$lib.so."* 2>/dev/null | grep -E "^lib$lib\.so\.[0-9]+$" | head -n1)"
    [[ -n "$name" ]] || { echo "no lib$lib.so.N in $CU13/lib" >&2; exit 1; }
    ln -sfn "../$name" "$LINK/lib$lib.so"
  done
  build_libcuda_stub
}

# A stub libcuda.so.1 exporting every driver entry point cudarc declares.
build_libcuda_stub() {
  local cudarc sys
  cudarc="$(cargo metadata --format-version 1 --features cuda 2>/dev/null \
    | python3 -c 'import json,sys; m=json.load(sys.stdin); print(next(p["manifest_path"] for p in m["packages"] if p["name"]=="cudarc"))')"
  sys="$(dirname "$cudarc")/src/driver/sys/mod.rs"
  [[ -f "$sys" ]] || { echo "cannot find cudarc's driver bindings ($sys)" >&2; exit 1; }
  python3 - "$sys" "$CUDA_DIR/libcuda_stub.c" <<'PY'
import re, sys
names = sorted(set(re.findall(r'^pub unsafe fn (cu\w+)\(', open(sys.argv[1]).read(), re.M)))
assert len(names) > 300, f"only {len(names)} driver functions found"
with open(sys.argv[2], "w") as out:
    out.write("/* Link-time and no-GPU stand-in for the CUDA driver (generated by scripts/cuda_build.sh).\n"
              "   Every entry point returns CUDA_ERROR_STUB_LIBRARY (34). */\n")
    for n in names:
        out.write(f"int {n}(void) {{ return 34; }}\n")
PY
  cc -shared -fPIC -O1 -Wl,-soname,libcuda.so.1 -o "$LINK/libcuda.so" "$CUDA_DIR/libcuda_stub.c"
  ln -sfn "$LINK/libcuda.so" "$STUB_RUNTIME/libcuda.so.1"
}

print_env() {
  cat <<ENV
export PATH="$CU13/bin:\$PATH"
export CUDA_ROOT="$CU13"
export CUDA_COMPUTE_CAP="$CUDA_COMPUTE_CAP"
export CARGO_TARGET_DIR="$CARGO_TARGET_DIR"
export LD_LIBRARY_PATH="$CU13/lib:$STUB_RUNTIME\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}"
ENV
}

use_env() {
  [[ -e "$LINK/libcuda.so" ]] || setup
  eval "$(print_env)"
}

build() {
  use_env
  log "cargo build --release --features cuda (lib, examples, tests; candle-kernels takes ~12 min on 2 cores)"
  cargo build --release --workspace --features cuda --all-targets
}

check() {
  use_env
  log "CPU tests in the CUDA-featured build (no GPU here: GPU tests skip)"
  cargo test --release --workspace --features cuda
  log "the binaries link the CUDA libraries by soname"
  local bin
  bin="$CARGO_TARGET_DIR/release/examples/device_bench"
  ldd "$bin" | grep -E 'libcuda|libcublas|libnvrtc|libcurand|libcudart'
  mkdir -p "$CARGO_TARGET_DIR/cuda-check"
  log "device_bench on the CPU (the CUDA build; parity of the CPU against itself)"
  "$bin" parity --device cpu --out "$CARGO_TARGET_DIR/cuda-check/parity-cpu.json"
  log "a CUDA handle without a GPU is an error, not a crash"
  if "$bin" parity --device cuda:0 2>"$CARGO_TARGET_DIR/cuda-check/no-gpu.txt"; then
    echo "expected no CUDA device on this machine" >&2; exit 1
  fi
  cat "$CARGO_TARGET_DIR/cuda-check/no-gpu.txt"
  log "the CUDA build passes the CPU tests"
}

# The carried files of scripts/cuda_device.sh: the stripped binary and a real model that fits.
device() {
  use_env
  log "cargo build --release --features cuda --example device_bench"
  cargo build --release --features cuda --example device_bench
  mkdir -p .device
  # Stripped it is ~57 MiB (33 MB of it candle's compiled kernels, 14 MB their PTX), too close
  # to the 64 MiB a device call may carry: it travels gzipped (~16 MB).
  local bin="$CARGO_TARGET_DIR/release/examples/device_bench"
  strip -o "$CARGO_TARGET_DIR/device_bench.stripped" "$bin"
  rm -f .device/device_bench
  gzip -9 -c "$CARGO_TARGET_DIR/device_bench.stripped" > .device/device_bench.gz
  local smol=models/SmolLM2-135M-Instruct.Q4_1.gguf
  [[ -f "$smol" ]] || python3 scripts/fetch_models.py smollm2
  "$bin" truncate --gguf "$smol" --layers 4 --out .device/smollm2-4l.gguf
  du -ah .device
  echo "carried by scripts/cuda_device.sh: $(du -cb .device/device_bench.gz .device/*.gguf | tail -n1 | cut -f1) bytes"
}

case "${1:-all}" in
  setup) setup ;;
  env) print_env ;;
  build) build ;;
  check) check ;;
  device) device ;;
  all) setup; build; check ;;
  *) echo "usage: $0 [setup|build|check|device|env|all]" >&2; exit 2 ;;
esac
