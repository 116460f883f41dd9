#!/usr/bin/env bash
# Build llama.cpp's `llama-bench` and `llama-server` from the llama.cpp sources vendored in the
# llama-cpp-python sdist of the *installed* version, so the reference numbers come from the same llama.cpp
# commit as the agent's engine. Output: .cache/llama-tools/bin/{llama-bench,llama-server}. Idempotent: a
# second run with the same version does nothing. Nothing here is committed (.cache/ is ignored).
#
# Usage: bench/build-llama-tools.sh            (PY=.venv/bin/python by default; JOBS=nproc by default)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PY:-$ROOT/.venv/bin/python}"
JOBS="${JOBS:-$(nproc 2>/dev/null || echo 2)}"
CACHE="$ROOT/.cache/llama-tools"
BIN="$CACHE/bin"

VERSION="$("$PY" -c 'import importlib.metadata as m; print(m.version("llama-cpp-python"))')"
STAMP="$BIN/.version"

if [[ -x "$BIN/llama-bench" && -x "$BIN/llama-server" && -f "$STAMP" && "$(cat "$STAMP")" == "$VERSION" ]]; then
  echo "llama-tools for llama-cpp-python $VERSION already built in $BIN"
  exit 0
fi

for tool in cmake c++; do
  command -v "$tool" >/dev/null || { echo "build-llama-tools: '$tool' is needed" >&2; exit 1; }
done

SRC_DIR="$CACHE/src"
mkdir -p "$SRC_DIR" "$BIN"
SDIST="$(ls "$SRC_DIR"/llama_cpp_python-"$VERSION".tar.gz 2>/dev/null || true)"
if [[ -z "$SDIST" ]]; then
  echo "downloading the llama-cpp-python $VERSION sdist"
  # `pip download` only fetches the archive: it installs nothing into the venv.
  "$PY" -m pip download --quiet --no-binary llama-cpp-python --no-deps \
    --dest "$SRC_DIR" "llama-cpp-python==$VERSION"
  SDIST="$(ls "$SRC_DIR"/llama_cpp_python-"$VERSION".tar.gz)"
fi

TREE="$SRC_DIR/llama_cpp_python-$VERSION"
if [[ ! -d "$TREE/vendor/llama.cpp" ]]; then
  tar -xzf "$SDIST" -C "$SRC_DIR"
fi
LLAMA="$TREE/vendor/llama.cpp"
[[ -f "$LLAMA/CMakeLists.txt" ]] || { echo "build-llama-tools: no vendored llama.cpp in $SDIST" >&2; exit 1; }

GEN=()
command -v ninja >/dev/null && GEN=(-G Ninja)
echo "building llama-bench and llama-server ($JOBS jobs; several minutes on 2 cores)"
cmake -S "$LLAMA" -B "$LLAMA/build" "${GEN[@]}" \
  -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF -DBUILD_SHARED_LIBS=OFF \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_SERVER=ON \
  >"$CACHE/cmake-configure.log"
cmake --build "$LLAMA/build" --config Release -j "$JOBS" --target llama-bench llama-server \
  >"$CACHE/cmake-build.log"

for tool in llama-bench llama-server; do
  install -m 0755 "$LLAMA/build/bin/$tool" "$BIN/$tool"
done
echo "$VERSION" >"$STAMP"
echo "built $BIN/llama-bench and $BIN/llama-server (llama-cpp-python $VERSION)"
