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
for b in wal recovery apply sim core transport; do
  out=$("$bench" "$b" --quick 2>/dev/null)
  echo "$out"
  echo "$out" | grep -q '"bench"' || { echo "tandem-bench $b printed no result" >&2; exit 1; }
  if [ "$b" = core ]; then
    # A ratio measured in one run, so the machine's noise mostly cancels: the core once
    # shifted its whole cache of recent records on every append once it was full, and ran
    # at 0.02 of its speed then; a working core is near 1.
    ratio=$(echo "$out" | sed -n 's/.*"full_to_filling_ratio":\([0-9.]*\).*/\1/p')
    awk -v r="$ratio" 'BEGIN { exit !(r >= 0.2) }' || { echo "tandem-bench core: proposals with a full cache at $ratio of the rate while it fills (at least 0.2 expected)" >&2; exit 1; }
  fi
done
# The cluster benchmark on real tandemd processes, quick: it must run end to end.
out=$("$bench" cluster --quick --deploy Deploy 2>/dev/null)
echo "$out"
for figure in floor commit_latency throughput linearizable_read catch_up snapshot failover; do
  echo "$out" | grep -q "\"figure\":\"$figure\"" || { echo "tandem-bench cluster printed no $figure figure" >&2; exit 1; }
done
echo "benchmarks: 7 passed, 0 failed"
