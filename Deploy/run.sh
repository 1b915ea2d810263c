#!/usr/bin/env bash
# The main job. Until tandemd serves (the daemon issue), it builds Tandem in release mode,
# creates a site's storage with the telehealth schema, writes and reads a few
# appointments through it, and runs the storage benchmarks.
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
echo "== Storage benchmarks (one JSON object per result on stdout)"
"$bin/tandem-bench" wal --dir "$work/bench"
"$bin/tandem-bench" recovery --dir "$work/bench"
"$bin/tandem-bench" apply --dir "$work/bench"
