#!/usr/bin/env bash
# Here (with PyPI access): fetch the llama-cpp-python sdist with pip and keep a trimmed copy of the llama.cpp
# sources it vendors in .llamacpp/ (git-ignored, ~20 MB): only what llama-bench (CUDA + CPU backends) and
# gguf-py need. The device run carries it; nothing of llama.cpp is committed.
# Usage, from the repo root: bash benchmarks/vs_llamacpp/fetch.sh [VERSION]
set -euo pipefail
VERSION=${1:-0.3.36}
DEST=.llamacpp
grep -qx "/$DEST/" .git/info/exclude 2>/dev/null || echo "/$DEST/" >> .git/info/exclude
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 -m pip download --quiet --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$tmp"
tar xzf "$tmp"/llama_cpp_python-"$VERSION".tar.gz -C "$tmp"
src="$tmp/llama_cpp_python-$VERSION/vendor/llama.cpp"
rm -rf "$DEST" && mkdir -p "$DEST"
cp -r "$src"/{CMakeLists.txt,cmake,common,include,src,vendor,gguf-py,LICENSE,licenses} "$DEST"/
mkdir -p "$DEST/ggml/src" "$DEST/tools"
cp -r "$src"/ggml/{CMakeLists.txt,cmake,include} "$DEST/ggml/"
find "$src/ggml/src" -maxdepth 1 -type f -exec cp {} "$DEST/ggml/src/" \;
cp -r "$src"/ggml/src/{ggml-cpu,ggml-cuda} "$DEST/ggml/src/"
cp -r "$src/tools/llama-bench" "$DEST/tools/"
# Only llama-bench among the tools; no tests, examples or web UI.
printf 'find_package(Threads REQUIRED)\nllama_add_compile_flags()\nadd_subdirectory(llama-bench)\n' > "$DEST/tools/CMakeLists.txt"
rm -rf "$DEST/vendor/miniaudio" "$DEST/gguf-py/tests" "$DEST/gguf-py/examples"
sed -i 's/^add_subdirectory(miniaudio)/# miniaudio: trimmed (mtmd only)/' "$DEST/vendor/CMakeLists.txt"
echo "llama-cpp-python $VERSION" > "$DEST/VERSION"
du -sh "$DEST"
