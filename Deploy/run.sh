#!/usr/bin/env bash
# The main job: builds Tandem in release mode, creates a site's storage with the
# telehealth schema and books a few appointments through it, replays the Strasbourg fire
# on a simulated cluster, starts three real tandemd processes on loopback and kills the
# primary with SIGKILL to watch another take over, then runs the benchmarks.
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
"$bin/tandem-sim" Simulations/*.json --seeds 20

echo
echo "== Three real tandemd processes on loopback (mutual TLS), and a fire: kill -9 of the primary"
export TANDEM_LOCAL="$work/cluster"
bash Deploy/local-cluster.sh start
primary=$( (grep -l 'becamePrimary' "$TANDEM_LOCAL"/*.log || true) | head -n 1 | xargs -r -n1 basename | sed 's/\.log$//')
if [ -n "$primary" ]; then
  killed_at=$(date +%s.%N)
  kill -9 "$(cat "$TANDEM_LOCAL/$primary.pid")"
  rm -f "$TANDEM_LOCAL/$primary.pid"
  echo "killed the primary, $primary, with SIGKILL"
  for _ in $(seq 1 100); do
    new=$( (grep -l 'becamePrimary' "$TANDEM_LOCAL"/*.log || true) | xargs -r -n1 basename | sed 's/\.log$//' | grep -v "^$primary$" | head -n 1 || true)
    [ -n "$new" ] && break
    sleep 0.1
  done
  elected_at=$(date +%s.%N)
  echo "new primary: ${new:-none}, $(python3 -c "print(round($elected_at - $killed_at, 2))") s after the kill"
fi
bash Deploy/local-cluster.sh stop

echo
echo "== Benchmarks (one JSON object per result on stdout)"
"$bin/tandem-bench" wal --dir "$work/bench"
"$bin/tandem-bench" recovery --dir "$work/bench"
"$bin/tandem-bench" apply --dir "$work/bench"
"$bin/tandem-bench" sim
