#!/usr/bin/env bash
# Build llama.cpp's llama-server and llama-bench natively (-DGGML_NATIVE=ON) from the sources
# vendored in the llama-cpp-python sdist, once; later calls print the cached folder at once.
#
#   bash scripts/llamacpp_build.sh            # prints the folder holding the binaries
#
# LLAMACPP_VERSION (default 0.3.36) picks the sdist; DFLASH_LLAMACPP_DIR (default
# ~/.cache/dflash/llama.cpp) is where it is built. About 10 minutes on 2 cores.
set -euo pipefail
version="${LLAMACPP_VERSION:-0.3.36}"
root="${DFLASH_LLAMACPP_DIR:-${DFLASH_CACHE_DIR:-$HOME/.cache/dflash}/llama.cpp}/$version"
bin="$root/build/bin"
if [[ -x "$bin/llama-server" && -x "$bin/llama-bench" ]]; then
    echo "$root"
    exit 0
fi
mkdir -p "$root"
if [[ ! -d "$root/src/vendor/llama.cpp" ]]; then
    echo "llamacpp_build: fetching the llama-cpp-python $version sdist ..." >&2
    tmp="$(mktemp -d)"
    python -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$version" -d "$tmp" >&2
    rm -rf "$root/src" && mkdir -p "$root/src"
    tar -xzf "$tmp"/llama_cpp_python-*.tar.gz -C "$root/src" --strip-components=1
    rm -rf "$tmp"
fi
echo "llamacpp_build: building llama-server and llama-bench natively (once, ~10 min on 2 cores) ..." >&2
cmake -S "$root/src/vendor/llama.cpp" -B "$root/build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \
    -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF >&2
cmake --build "$root/build" --target llama-server llama-bench -j "$(nproc)" >&2
echo "$root"
