#!/usr/bin/env bash
# The main job: builds Tandem in release mode, creates a site's storage with the
# telehealth schema and books a few appointments through it, replays the Strasbourg fire
# on a simulated cluster, runs the benchmarks, then starts a local cluster of three real
# tandemd processes on loopback, books appointments through its API, runs the fire drill
# on it (Deploy/fire-drill.sh: the primary killed under load, three times, and a report of
# what was kept), and shows `tandemctl status`. The cluster keeps running;
# `bash Deploy/local-cluster.sh stop` stops it.
set -euo pipefail
cd "$(dirname "$0")/.."

bash Deploy/setup.sh
# The flags Deploy/test.sh builds with (it adds the test targets): with other flags, a
# user who runs both would compile the whole package twice.
swift build -c release -Xswiftc -enable-testing

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
echo "== Benchmarks (one JSON object per result on stdout)"
"$bin/tandem-bench" wal --dir "$work/bench"
"$bin/tandem-bench" recovery --dir "$work/bench"
"$bin/tandem-bench" apply --dir "$work/bench"
"$bin/tandem-bench" sim

echo
echo "== A local cluster: three real tandemd processes on loopback (mutual TLS, a development CA)"
export TANDEM_LOCAL=${TANDEM_LOCAL:-/tmp/tandem-local}
bash Deploy/local-cluster.sh stop >/dev/null
rm -rf "$TANDEM_LOCAL"
bash Deploy/local-cluster.sh start
token=$(cat "$TANDEM_LOCAL/token")
api() { curl -sS -H "Authorization: Bearer $token" -H "Content-Type: application/json" "$@"; echo; }
echo
echo "-- booking through Gravelines (a replica forwards writes to the primary); the second overlaps the first: 409"
api -X POST http://127.0.0.1:8402/v1/appointments \
  -d '{"practitioner":"DR-NEURO-1","practitioner_name":"Dr Weber","patient":"PAT-0001","starts_at":"2026-03-10T09:00:00Z","duration_minutes":30}'
api -X POST http://127.0.0.1:8402/v1/appointments \
  -d '{"practitioner":"DR-NEURO-1","patient":"PAT-0002","starts_at":"2026-03-10T09:15:00Z","duration_minutes":30}'
echo "-- the day's list, read linearizably through Roubaix"
api "http://127.0.0.1:8403/v1/appointments?practitioner=DR-NEURO-1&day=2026-03-10"

echo
echo "== The fire drill on that cluster: bookings through every site, the primary killed with SIGKILL, three times"
bash Deploy/fire-drill.sh
echo
bash Deploy/local-cluster.sh status
echo
"$bin/tandemctl" verify --config "$TANDEM_LOCAL/sbg.toml" --token "$token"
echo
echo "The cluster keeps running: try the API with the token in $TANDEM_LOCAL/token (see README.md)."
echo "Stop it with:  bash Deploy/local-cluster.sh stop"
