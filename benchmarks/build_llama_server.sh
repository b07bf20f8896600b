#!/usr/bin/env bash
# Build llama.cpp's own `llama-server` from the llama.cpp that the installed llama-cpp-python
# vendors, so benchmarks/session_turns.py compares llmup with the very same engine.
#
#   bash benchmarks/build_llama_server.sh            # builds if needed, prints the binary's path
#   bash benchmarks/build_llama_server.sh --path-only  # only prints where the binary goes
#
# The build goes to a cache folder outside the repository ($LLMUP_BENCH_CACHE, default
# ~/.cache/llmup-bench/llama-server-<version>); a second run only prints the path. It takes
# about 10 minutes on 2 cores. Needs cmake and a C++ compiler; pip downloads the sdist
# (`pip download --no-binary :all: --no-deps llama-cpp-python==<installed version>`).
set -euo pipefail

python=${PYTHON:-python}
version=$("$python" -c "import llama_cpp; print(llama_cpp.__version__)")
cache=${LLMUP_BENCH_CACHE:-$HOME/.cache/llmup-bench}
root="$cache/llama-server-$version"
binary="$root/build/bin/llama-server"

if [[ "${1:-}" == "--path-only" || -x "$binary" ]]; then
    echo "$binary"
    exit 0
fi

mkdir -p "$root"
if [[ ! -d "$root/src" ]]; then
    "$python" -m pip download --no-binary :all: --no-deps --dest "$root/sdist" \
        "llama-cpp-python==$version" >&2
    mkdir -p "$root/src"
    tar -xzf "$root"/sdist/llama_cpp_python-"$version".tar.gz -C "$root/src" --strip-components=1
fi

cmake -S "$root/src/vendor/llama.cpp" -B "$root/build" \
    -DCMAKE_BUILD_TYPE=Release -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_EXAMPLES=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_CURL=OFF -DBUILD_SHARED_LIBS=OFF >&2
cmake --build "$root/build" --target llama-server -j "$(nproc)" >&2
echo "$binary"
