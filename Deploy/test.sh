#!/usr/bin/env bash
# The whole test suite: installs what is missing, builds, runs every test, then a quick
# smoke run of each benchmark so those commands cannot rot.
set -euo pipefail
cd "$(dirname "$0")/.."

bash Deploy/setup.sh

swift build --build-tests
swift test --skip-build

# Benchmarks, quick mode, debug build: they must run and print their JSON lines.
bench=".build/debug/tandem-bench"
for b in wal recovery apply; do
  out=$("$bench" "$b" --quick 2>/dev/null)
  echo "$out"
  echo "$out" | grep -q '"bench"' || { echo "tandem-bench $b printed no result" >&2; exit 1; }
done
echo "benchmarks: 3 passed, 0 failed"
