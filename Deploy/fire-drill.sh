#!/usr/bin/env bash
# The fire drill: a telehealth workload (bookings through every site, linearizable reads)
# against the local cluster, the primary killed with SIGKILL as a fire would, three times,
# then what happened: who became primary, how long writes paused, how many bookings were
# acknowledged, and that none were lost (checked on every site) and every site converged.
#
#   Deploy/fire-drill.sh           drill the cluster of Deploy/local-cluster.sh ($TANDEM_LOCAL),
#                                  starting it if it is not running
#   Deploy/fire-drill.sh --own     start a separate three-site cluster for the drill, then remove it
#
# Exits 1 if an acknowledged booking was lost, a read was not linearizable, or the sites differ.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${TANDEM_BIN:-.build/release}
if [ ! -x "$bin/tandem-drill" ] || [ ! -x "$bin/tandemd" ] || [ ! -x "$bin/tandemctl" ]; then swift build -c release; fi
rounds=${TANDEM_DRILL_ROUNDS:-3}
if [ "${1:-}" = "--own" ]; then
  exec "$bin/tandem-drill" --rounds "$rounds" --deploy Deploy
fi
export TANDEM_LOCAL=${TANDEM_LOCAL:-/tmp/tandem-local}
running=0
for port in 8401 8402 8403; do
  if curl -fs -o /dev/null "http://127.0.0.1:$port/liveness"; then running=$((running + 1)); fi
done
if [ "$running" -lt 3 ]; then bash Deploy/local-cluster.sh start; fi
"$bin/tandem-drill" --local "$TANDEM_LOCAL" --rounds "$rounds" --deploy Deploy
