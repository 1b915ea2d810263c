#!/usr/bin/env bash
# Starts a three-site cluster on loopback (Strasbourg, Gravelines, Roubaix) with a
# development CA made for it, and waits until a primary is elected.
#
#   Deploy/local-cluster.sh start     (default)  build, make certificates, configs and an API token, start
#   Deploy/local-cluster.sh stop                 stop the three daemons
#   Deploy/local-cluster.sh status               tandemctl status: roles, terms, LSNs, lag, placement
#   Deploy/local-cluster.sh start-site SITE      start one site again (after a drill killed it)
#
# Everything lives in $TANDEM_LOCAL (default /tmp/tandem-local): certificates, one
# configuration file and one data directory per site, logs, and $TANDEM_LOCAL/token, an
# admin API token for trying the data API:
#   curl -H "Authorization: Bearer $(cat /tmp/tandem-local/token)" http://127.0.0.1:8402/v1/appointments?patient=PAT-1
set -euo pipefail
cd "$(dirname "$0")/.."
root=${TANDEM_LOCAL:-/tmp/tandem-local}
sites=(sbg gra rbx)
domains=(strasbourg gravelines roubaix)
bin=${TANDEM_BIN:-.build/release}

stop() {
  for s in "${sites[@]}"; do
    local pidfile="$root/$s.pid"
    [ -f "$pidfile" ] || continue
    local pid
    pid=$(cat "$pidfile")
    # Only a tandemd of this cluster: a stale pid file must not kill another process.
    if grep -qa "tandemd" "/proc/$pid/cmdline" 2>/dev/null; then
      kill "$pid" 2>/dev/null || true
      # SIGTERM: a primary hands its office over first (up to the transfer timeout).
      for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      kill -9 "$pid" 2>/dev/null || true
    fi
    rm -f "$pidfile"
  done
}

status() {
  "$bin/tandemctl" status --config "$root/sbg.toml"
}

start_site() {
  local s=$1 init=()
  # --init only for a site that never had data: a site that lost its data directory must
  # be rebuilt (tandemctl rebuild) rather than silently start empty.
  [ -e "$root/data-$s" ] || [ -e "$root/$s.started" ] || init=(--init)
  touch "$root/$s.started"
  nohup "$bin/tandemd" --config "$root/$s.toml" "${init[@]}" >>"$root/$s.log" 2>&1 &
  echo $! > "$root/$s.pid"
}

case "${1:-start}" in
  stop) stop; echo "stopped"; exit 0 ;;
  status) status; exit 0 ;;
  start-site) start_site "${2:?which site}"; exit 0 ;;
  start) ;;
  *) echo "usage: $0 [start|stop|status|start-site SITE]" >&2; exit 2 ;;
esac

if [ ! -x "$bin/tandemd" ] || [ ! -x "$bin/tandemctl" ]; then swift build -c release; fi
stop
mkdir -p "$root"
bash Deploy/make-certs.sh "$root/pki" "${sites[@]}" >/dev/null
cluster=$(cat "$root/cluster-id" 2>/dev/null || true)
if [ -z "$cluster" ]; then
  cluster=$(python3 -c 'import uuid; print(uuid.uuid4())' 2>/dev/null || cat /proc/sys/kernel/random/uuid)
  echo "$cluster" > "$root/cluster-id"
fi

if [ ! -s "$root/token" ]; then
  rm -f "$root/tokens"
  "$bin/tandemctl" token --name operator --scope admin --file "$root/tokens" > "$root/token" 2>/dev/null
fi

for i in 0 1 2; do
  s=${sites[$i]}
  cat > "$root/$s.toml" <<CONF
# Site $s of a local three-site cluster (loopback, development CA).
cluster_id = "$cluster"
site_id = "$s"
data_directory = "$root/data-$s"
commit_policy = "majority"

[listen]
peer = "127.0.0.1:$((7401 + i))"
http = "127.0.0.1:$((8401 + i))"

[api]
token_file = "$root/tokens"

[tls]
certificate = "$root/pki/$s.pem"
private_key = "$root/pki/$s.key"
ca = "$root/pki/ca.pem"
CONF
  for j in 0 1 2; do
    cat >> "$root/$s.toml" <<CONF

[[sites]]
id = "${sites[$j]}"
domain = "${domains[$j]}"
peer_address = "127.0.0.1:$((7401 + j))"
http_address = "127.0.0.1:$((8401 + j))"
CONF
  done
  "$bin/tandemd" --check-config "$root/$s.toml" >/dev/null
done

for s in "${sites[@]}"; do start_site "$s"; done

elected=0
for _ in $(seq 1 150); do
  if curl -fs -o /dev/null http://127.0.0.1:8401/primary || curl -fs -o /dev/null http://127.0.0.1:8402/primary \
     || curl -fs -o /dev/null http://127.0.0.1:8403/primary; then elected=1; break; fi
  sleep 0.1
done
status
if [ $elected -eq 0 ]; then echo "no primary was elected within 15 s; see $root/*.log" >&2; exit 1; fi
echo "logs: $root/*.log   API token: $root/token   stop: $0 stop"
