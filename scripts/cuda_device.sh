#!/usr/bin/env bash
# The GPU run of issue 15, for a lent GPU machine (H200, CUDA 13 driver, CUDA libraries in its
# Python environment's nvidia-* packages; no Rust toolchain, no registry, no model hub).
#
# Prepare on the build machine (needs scripts/cuda_build.sh setup):
#   scripts/cuda_build.sh device
#     -> .device/device_bench.gz    the CUDA build of examples/device_bench.rs, stripped, gzipped
#     -> .device/smollm2-4l.gguf    SmolLM2-135M cut to its first 4 blocks (a real model that fits)
# Run on the GPU machine (the device tool; one call, well inside its 10 minutes):
#   run(command="bash scripts/cuda_device.sh", carry=[".device"], timeout_s=590)
#   -> $OUT/parity.json, costs.json, projection.json, projection.md, log.txt, gpu.txt
# Rehearse the same binary and arguments here, on the CPU, with the stub driver:
#   scripts/cuda_device.sh --dry-run
set -uo pipefail
cd "$(dirname "$0")/.."

DRY_RUN=0
[[ "${1:-}" == "--dry-run" ]] && DRY_RUN=1
OUT="${OUT:-target/cuda-device}"
mkdir -p "$OUT"
[[ -f .device/device_bench.gz ]] \
  || { echo ".device/device_bench.gz is missing: run scripts/cuda_build.sh device first" >&2; exit 1; }
BIN="${TMPDIR:-/tmp}/device_bench"
gzip -dc .device/device_bench.gz > "$BIN" && chmod +x "$BIN"

# The CUDA libraries the binary links by soname (libcublas.so.13, libcublasLt.so.13,
# libcurand.so.10, libnvrtc.so.13, libcudart.so.13): from nvidia-* wheels of the Python
# environment there, or from .cuda/ here. libcuda.so.1 is the driver's.
lib_dirs="$(python3 - <<'PY'
import glob, os, site, sys
roots = set(site.getsitepackages() + [site.getusersitepackages()] + sys.path)
roots.add(os.path.join(os.getcwd(), ".cuda", "py"))
dirs = set()
for root in roots:
    for name in ("libcublas.so.*", "libcublasLt.so.*", "libcurand.so.*", "libnvrtc.so.*", "libcudart.so.*"):
        for path in glob.glob(os.path.join(root, "nvidia", "**", name), recursive=True):
            dirs.add(os.path.dirname(path))
print(":".join(sorted(dirs)))
PY
)"
export LD_LIBRARY_PATH="${lib_dirs}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
if [[ $DRY_RUN == 1 ]]; then
  # No driver here: the stub from scripts/cuda_build.sh (every call returns an error).
  export LD_LIBRARY_PATH="$PWD/.cuda/stub-runtime:$LD_LIBRARY_PATH"
elif ldd "$BIN" | grep -q 'libcuda.so.1 => not found'; then
  # The driver's library off the loader's default path (e.g. a mounted driver folder).
  driver="$(find /usr/local/nvidia /usr/lib/x86_64-linux-gnu /usr/lib64 /usr/lib /usr/local/cuda* \
    -name 'libcuda.so.1' -print -quit 2>/dev/null)"
  [[ -n "$driver" ]] && export LD_LIBRARY_PATH="$(dirname "$driver"):$LD_LIBRARY_PATH"
fi

{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv 2>&1 || echo "no nvidia-smi"
  nproc
  echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
  ldd "$BIN"
} > "$OUT/gpu.txt" 2>&1
cat "$OUT/gpu.txt"
if ldd "$BIN" | grep -q 'not found'; then
  echo "a library the binary needs is missing (see above)" >&2
  exit 1
fi

GGUF=()
for f in .device/*.gguf; do [[ -f "$f" ]] && GGUF+=(--gguf "$f"); done

if [[ $DRY_RUN == 1 ]]; then
  # Everything but the CUDA handles, small enough for 2 cores: the CPU against itself, a tiny
  # target and the 0.5B draft on the CPU, and the projection from those costs.
  ARGS=(all --target-device cpu --draft-device cpu --targets tiny --draft qwen2.5-0.5b
        --dtype f32 --ks 1,2,4,8 --repeats 3 --cpu-cores 0,1 "${GGUF[@]}" --out-dir "$OUT")
else
  ARGS=(all --target-device cuda:0 --draft-device cuda:0 --targets qwen2.5-7b,qwen2.5-14b
        --draft qwen2.5-0.5b --dtype bf16 --repeats 10 "${GGUF[@]}" --out-dir "$OUT")
fi
echo "+ $BIN ${ARGS[*]}"
timeout 560 "$BIN" "${ARGS[@]}" 2>&1 | tee "$OUT/log.txt"
status=${PIPESTATUS[0]}
echo "device_bench exit status: $status"
exit "$status"
