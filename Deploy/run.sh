#!/usr/bin/env bash
# The main job. Until tandemd serves (the daemon issue), it builds Tandem in release mode,
# creates a site's storage with the telehealth schema, writes and reads a few
# appointments through it, replays the Strasbourg fire on a simulated three-site cluster,
# and runs the storage and simulator benchmarks.
set -euo pipefail
cd "$(dirname "$0")/.."

bash Deploy/setup.sh
swift build -c release

bin=.build/release
work=$(mktemp -d "${TMPDIR:-/tmp}/tandem-run.XXXXXX")
trap 'rm -rf "$work"' EXIT

echo "== A site's storage: bootstrap, telehealth schema, a few writes, crash-safe reopen"
"$bin/tandemctl" init --data-dir "$work/site" --cluster-id 0b6f3a3e-6a53-4d0e-9f0c-5c2d8e8f7a10
"$bin/tandemctl" demo-writes --data-dir "$work/site" --cluster-id 0b6f3a3e-6a53-4d0e-9f0c-5c2d8e8f7a10
"$bin/tandemctl" inspect --data-dir "$work/site" --cluster-id 0b6f3a3e-6a53-4d0e-9f0c-5c2d8e8f7a10

echo
svg="${TMPDIR:-/tmp}/tandem-strasbourg-fire.svg"
echo "== The Strasbourg fire, replayed in virtual time on a simulated cluster (picture: $svg)"
"$bin/tandem-sim" Simulations/strasbourg-fire.json --seed 1 --svg "$svg"
"$bin/tandem-sim" Simulations/*.json --seeds 20 | tail -n 12

echo
echo "== Benchmarks (one JSON object per result on stdout)"
"$bin/tandem-bench" wal --dir "$work/bench"
"$bin/tandem-bench" recovery --dir "$work/bench"
"$bin/tandem-bench" apply --dir "$work/bench"
"$bin/tandem-bench" sim
