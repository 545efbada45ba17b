#!/bin/sh
# Build the C load generator: bench/build_loadgen.sh [OUT]   (default OUT: build/loadgen)
# Exits non-zero when there is no C compiler: bench/loadgen.py is the fallback (and the reference).
set -eu
here="$(cd "$(dirname "$0")" && pwd)"
out="${1:-$here/../build/loadgen}"
cc="${CC:-cc}"
command -v "$cc" >/dev/null 2>&1 || { echo "build_loadgen: no C compiler ($cc)" >&2; exit 1; }
mkdir -p "$(dirname "$out")"
exec "$cc" -O2 -Wall -Wextra -o "$out" "$here/loadgen.c"
