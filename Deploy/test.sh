#!/usr/bin/env bash
# The whole test suite: installs what is missing, builds once (release, so the disaster
# simulations run 100 seeds per scenario in seconds), runs every test, then a quick run
# of each benchmark so those commands cannot rot.
set -euo pipefail
cd "$(dirname "$0")/.."

bash Deploy/setup.sh

# -enable-testing: the test targets use @testable imports.
swift build -c release --build-tests -Xswiftc -enable-testing
# Tests of real sites (in-process sites on loopback, and the fire drills on tandemd
# processes) run on their own, after the rest: they depend on wall-clock leases and pauses,
# which the CPU-bound suites (simulations, crash tests) beside them on a 2-core machine
# would distort.
swift test -c release --skip-build --skip TandemDrillTests --skip TandemNodeTests
swift test -c release --skip-build --filter TandemNodeTests
swift test -c release --skip-build --filter TandemDrillTests

# Benchmarks, quick mode: they must run and print their JSON lines.
bench=".build/release/tandem-bench"
for b in wal recovery apply sim transport; do
  out=$("$bench" "$b" --quick 2>/dev/null)
  echo "$out"
  echo "$out" | grep -q '"bench"' || { echo "tandem-bench $b printed no result" >&2; exit 1; }
done
# The cluster benchmark on real tandemd processes, quick: it must run end to end.
out=$("$bench" cluster --quick --deploy Deploy 2>/dev/null)
echo "$out"
for figure in floor commit_latency throughput linearizable_read catch_up snapshot failover; do
  echo "$out" | grep -q "\"figure\":\"$figure\"" || { echo "tandem-bench cluster printed no $figure figure" >&2; exit 1; }
done
echo "benchmarks: 6 passed, 0 failed"
