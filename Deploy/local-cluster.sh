#!/usr/bin/env bash
# Starts a three-site cluster on loopback (Strasbourg, Gravelines, Roubaix) with a
# development CA made for it, and waits until a primary is elected.
#
#   Deploy/local-cluster.sh start     (default)  build, make certificates and configs, start
#   Deploy/local-cluster.sh stop                 stop the three daemons
#   Deploy/local-cluster.sh status               show who is primary, from the logs
#
# Everything lives in $TANDEM_LOCAL (default /tmp/tandem-local): certificates, one
# configuration file and one data directory per site, logs.
set -euo pipefail
cd "$(dirname "$0")/.."
root=${TANDEM_LOCAL:-/tmp/tandem-local}
sites=(sbg gra rbx)
domains=(strasbourg gravelines roubaix)
bin=${TANDEM_BIN:-.build/release}

stop() {
  for s in "${sites[@]}"; do
    if [ -f "$root/$s.pid" ]; then
      kill "$(cat "$root/$s.pid")" 2>/dev/null || true
      rm -f "$root/$s.pid"
    fi
  done
}

status() {
  for s in "${sites[@]}"; do
    local state="stopped"
    if [ -f "$root/$s.pid" ] && kill -0 "$(cat "$root/$s.pid")" 2>/dev/null; then state="running (pid $(cat "$root/$s.pid"))"; fi
    local last
    last=$( (grep -h 'event=role_change' "$root/$s.log" 2>/dev/null || true) | tail -n 1 | sed 's/.*change="\(.*\)"/\1/')
    echo "$s: $state; last role change: ${last:-none}"
  done
}

case "${1:-start}" in
  stop) stop; echo "stopped"; exit 0 ;;
  status) status; exit 0 ;;
  start) ;;
  *) echo "usage: $0 [start|stop|status]" >&2; exit 2 ;;
esac

[ -x "$bin/tandemd" ] || swift build -c release --product tandemd
stop
mkdir -p "$root"
bash Deploy/make-certs.sh "$root/pki" "${sites[@]}" >/dev/null
cluster=$(cat "$root/cluster-id" 2>/dev/null || true)
if [ -z "$cluster" ]; then
  cluster=$(python3 -c 'import uuid; print(uuid.uuid4())' 2>/dev/null || cat /proc/sys/kernel/random/uuid)
  echo "$cluster" > "$root/cluster-id"
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

for s in "${sites[@]}"; do
  nohup "$bin/tandemd" --config "$root/$s.toml" --init >>"$root/$s.log" 2>&1 &
  echo $! > "$root/$s.pid"
done

for _ in $(seq 1 100); do
  if grep -qh 'becamePrimary' "$root"/*.log 2>/dev/null; then break; fi
  sleep 0.1
done
status
echo "logs: $root/*.log   stop: $0 stop"
