#!/usr/bin/env bash
# Tandem side by side with what users would pick instead, on this machine, in one run:
#   - etcd (Debian's etcd-server): three members on loopback; puts of 256-byte values at
#     1, 16 and 64 clients (through its JSON gateway, driven by the same client as Tandem:
#     tandem-bench http), and the time to a successful put after kill -9 of the leader
#     (each acknowledged put looked for afterwards, as Tandem's acknowledged writes are);
#   - PostgreSQL 15 with one synchronous standby (synchronous_commit = on, then
#     remote_apply): single-row inserts of 256 bytes at 1, 16 and 64 clients with pgbench.
# Everything listens on loopback only and is stopped at the end, also on failure.
#
#   Deploy/bench/compare.sh [--install] [--quick]
#
# --install installs etcd-server, etcd-client and postgresql-15 from Debian's packages
# (as root). Prints one JSON line per figure, then a table with Tandem ÷ peer.
set -euo pipefail
cd "$(dirname "$0")/../.."
install=0 quick=0
for a in "$@"; do
  case "$a" in
    --install) install=1 ;;
    --quick) quick=1 ;;
    *) echo "usage: $0 [--install] [--quick]" >&2; exit 2 ;;
  esac
done
seconds=5; samples=1000; failovers=20  # issue 7: failover over 20 rounds
if [ $quick -eq 1 ]; then seconds=1; samples=100; failovers=2; fi

if [ $install -eq 1 ]; then
  [ "$(id -u)" -eq 0 ] || { echo "compare: --install needs root (apt-get)" >&2; exit 1; }
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq etcd-server etcd-client postgresql-15 >/dev/null
fi

bin=.build/release
[ -x "$bin/tandem-bench" ] && [ -x "$bin/tandemd" ] || swift build -c release
work=$(mktemp -d "${TMPDIR:-/tmp}/tandem-compare.XXXXXX")
chmod 755 "$work"
results="$work/results.jsonl"
pids=()
pgdirs=()
cleanup() {
  for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done
  for d in "${pgdirs[@]}"; do as_pg pg_ctl -D "$d" -m immediate stop >/dev/null 2>&1 || true; done
  rm -rf "$work"
}
trap cleanup EXIT
# Starts a PostgreSQL data directory; when it does not come up, shows why (its log).
pg_start() {
  if ! as_pg pg_ctl -D "$1" -l "$1.log" -w start >/dev/null; then
    echo "compare: PostgreSQL in $1 did not start; the end of its log:" >&2
    tail -n 20 "$1.log" >&2 || true
    exit 1
  fi
}
as_pg() { if [ "$(id -u)" -eq 0 ]; then runuser -u postgres -- env PATH="/usr/lib/postgresql/15/bin:$PATH" "$@"; else env PATH="/usr/lib/postgresql/15/bin:$PATH" "$@"; fi; }
value=$(head -c 192 /dev/urandom | base64 -w0)   # 256 characters

echo "== Tandem (three tandemd on loopback, TLS, default settings)" >&2
args=(--seconds "$seconds" --failovers "$failovers" --dir "$work" --deploy Deploy)
[ $quick -eq 1 ] && args+=(--quick)
"$bin/tandem-bench" cluster "${args[@]}" | tee -a "$results"

if command -v etcd >/dev/null 2>&1; then
  echo "== etcd: three members on loopback" >&2
  cluster=""
  for i in 1 2 3; do cluster+="e$i=http://127.0.0.1:$((32380 + i * 10)),"; done
  cluster=${cluster%,}
  start_etcd() {
    local i=$1 state=$2
    etcd --name "e$i" --data-dir "$work/etcd-$i" --listen-client-urls "http://127.0.0.1:$((32379 + i * 10))" \
      --advertise-client-urls "http://127.0.0.1:$((32379 + i * 10))" --listen-peer-urls "http://127.0.0.1:$((32380 + i * 10))" \
      --initial-advertise-peer-urls "http://127.0.0.1:$((32380 + i * 10))" --initial-cluster "$cluster" \
      --initial-cluster-state "$state" --initial-cluster-token tandem-compare >"$work/etcd-$i.log" 2>&1 &
    echo $!
  }
  declare -A epid
  for i in 1 2 3; do epid[$i]=$(start_etcd "$i" new); pids+=("${epid[$i]}"); done
  endpoints="127.0.0.1:32389,127.0.0.1:32399,127.0.0.1:32409"
  for _ in $(seq 1 100); do ETCDCTL_API=3 etcdctl --endpoints "$endpoints" endpoint health >/dev/null 2>&1 && break; sleep 0.2; done
  leader() { ETCDCTL_API=3 etcdctl --endpoints "$endpoints" endpoint status -w json 2>/dev/null \
    | python3 -c 'import json,sys; s=json.load(sys.stdin); print([e["Endpoint"] for e in s if e["Status"]["leader"]==e["Status"]["header"]["member_id"]][0])'; }
  lead=$(leader)
  body="{\"key\":\"$(printf bench | base64)\",\"value\":\"$value\"}"
  "$bin/tandem-bench" http --system etcd --url "http://$lead/v3/kv/put" --body "$body" --seconds "$seconds" --samples "$samples" | tee -a "$results"
  # Failover: kill -9 of the leader, until a put succeeds on a survivor. Every put that
  # succeeded (one on the leader before each kill, the first after it) has a key of its
  # own and is looked for at the end, as Tandem's acknowledged writes are.
  times=()
  : > "$work/etcd-acked"
  put() { # put KEY PORT: 0 when etcd acknowledged it
    curl -fs -m 1 -X POST -d "{\"key\":\"$(printf '%s' "$1" | base64 -w0)\",\"value\":\"$value\"}" \
      "http://127.0.0.1:$2/v3/kv/put" >/dev/null 2>&1 && echo "$1" >> "$work/etcd-acked"
  }
  for round in $(seq 1 "$failovers"); do
    lead=$(leader)
    port=${lead##*:}
    i=$(( (port - 32379) / 10 ))
    put "acked-$round-before" "$port" || true
    t0=$(date +%s.%N)
    kill -9 "${epid[$i]}"
    ok=0 k=0
    while [ $ok -eq 0 ]; do
      for j in 1 2 3; do
        [ "$j" = "$i" ] && continue
        k=$((k + 1))
        if put "acked-$round-after-$k" "$((32379 + j * 10))"; then ok=1; break; fi
      done
    done
    t1=$(date +%s.%N)
    times+=("$(python3 -c "print($t1 - $t0)")")
    epid[$i]=$(start_etcd "$i" existing); pids+=("${epid[$i]}")
    sleep 2
  done
  ETCDCTL_API=3 etcdctl --endpoints "$endpoints" get acked- --prefix --keys-only > "$work/etcd-present"
  python3 - "$work/etcd-acked" "$work/etcd-present" "${times[@]}" <<'PY' | tee -a "$results"
import json, sys
acked = [l.strip() for l in open(sys.argv[1]) if l.strip()]
present = {l.strip() for l in open(sys.argv[2]) if l.strip()}
t = sorted(float(x) for x in sys.argv[3:])
p = lambda q: t[min(len(t) - 1, int(len(t) * q))]
print(json.dumps({"bench": "peer", "system": "etcd", "figure": "failover", "rounds": len(t), "p50_s": round(p(0.5), 3), "p99_s": round(p(0.99), 3),
                  "acknowledged_writes": len(acked), "lost_acknowledged": sum(1 for k in acked if k not in present)}))
PY
else
  echo "compare: etcd is not installed (run with --install); skipped" >&2
fi

if [ -x /usr/lib/postgresql/15/bin/initdb ] && command -v pgbench >/dev/null 2>&1; then
  echo "== PostgreSQL 15: a primary and one synchronous standby on loopback" >&2
  chown -R postgres "$work" 2>/dev/null || true
  as_pg initdb -D "$work/pg-primary" -A trust -U bench >/dev/null
  cat >> "$work/pg-primary/postgresql.conf" <<CONF
listen_addresses = '127.0.0.1'
port = 35432
unix_socket_directories = '$work'
synchronous_standby_names = '*'
synchronous_commit = on
wal_level = replica
max_wal_senders = 4
fsync = on
CONF
  echo "host replication bench 127.0.0.1/32 trust" >> "$work/pg-primary/pg_hba.conf"
  pgdirs+=("$work/pg-primary")
  pg_start "$work/pg-primary"
  as_pg pg_basebackup -h 127.0.0.1 -p 35432 -U bench -D "$work/pg-standby" -R >/dev/null
  cat >> "$work/pg-standby/postgresql.conf" <<CONF
port = 35433
primary_conninfo = 'host=127.0.0.1 port=35432 user=bench application_name=standby1'
CONF
  pgdirs+=("$work/pg-standby")
  pg_start "$work/pg-standby"
  as_pg timeout 60 psql -h 127.0.0.1 -p 35432 -U bench -d postgres -qc "CREATE TABLE bench (id bigserial PRIMARY KEY, v text NOT NULL)"
  echo "INSERT INTO bench (v) VALUES ('$value');" > "$work/insert.sql"
  for mode in on remote_apply; do
    for clients in 1 16 64; do
      rm -f "$work"/pgbench_log.*
      out=$(cd "$work" && as_pg timeout $((seconds + 60)) env PGOPTIONS="-c synchronous_commit=$mode" pgbench -h 127.0.0.1 -p 35432 -U bench -n -f insert.sql \
        -c "$clients" -j "$([ "$clients" -gt 2 ] && echo 2 || echo 1)" -T "$seconds" -l postgres 2>&1; times)
      tps=$(echo "$out" | sed -n 's/^tps = \([0-9.]*\).*/\1/p' | head -n 1)
      # pgbench's own CPU (user + system of the subshell's children, from `times`), so a
      # saturated load generator shows next to its throughput as it does for the others.
      cpu=$(echo "$out" | tail -n 1 | awk '{ t = 0; for (i = 1; i <= 2; i++) { split($i, a, "m"); t += a[1] * 60 + a[2] } print t }')
      python3 - "$mode" "$clients" "${tps:-0}" "$work" "${cpu:-0}" "$seconds" <<'PY' | tee -a "$results"
import glob, json, sys
mode, clients, tps, work = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
cpu_share = round(float(sys.argv[5]) / float(sys.argv[6]), 3)
lat = sorted(int(line.split()[2]) for f in glob.glob(work + "/pgbench_log.*") for line in open(f) if line.strip())
p = lambda q: lat[min(len(lat) - 1, int(len(lat) * q))] / 1000 if lat else 0
print(json.dumps({"bench": "peer", "system": "postgresql-sync-" + mode, "figure": "throughput", "workload": "write_256b",
                  "clients": clients, "writes_per_second": int(tps), "client_cpu_share": cpu_share}))
if clients == 1:
    print(json.dumps({"bench": "peer", "system": "postgresql-sync-" + mode, "figure": "commit_latency", "clients": 1,
                      "p50_ms": round(p(0.5), 3), "p99_ms": round(p(0.99), 3)}))
PY
    done
  done
else
  echo "compare: PostgreSQL 15 is not installed (run with --install); skipped" >&2
fi

echo
python3 - "$results" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
def tandem(fig, **k):
    for r in rows:
        if r.get("bench") == "cluster" and r.get("figure") == fig and all(r.get(a) == b for a, b in k.items()) and "sites" not in r:
            return r
systems = sorted({r["system"] for r in rows if r.get("bench") == "peer"})
print(f"{'figure':38} {'tandem':>10} " + " ".join(f"{s:>26}" for s in systems))
def line(name, t, key, lower_better, peer_filter):
    cells = []
    for s in systems:
        p = next((r for r in rows if r.get("bench") == "peer" and r["system"] == s and peer_filter(r)), None)
        if p and t and p.get(key):
            ratio = t[key] / p[key]
            cells.append(f"{p[key]:>12} (T/p {ratio:5.2f})")
        else:
            cells.append(f"{'-':>26}")
    print(f"{name:38} {t[key] if t else '-':>10} " + " ".join(cells) + ("   lower is better" if lower_better else "   higher is better"))
t = tandem("commit_latency", through="primary", clients=1)
line("commit latency p50 ms (1 client)", t, "p50_ms", True, lambda r: r["figure"] == "commit_latency")
line("commit latency p99 ms (1 client)", t, "p99_ms", True, lambda r: r["figure"] == "commit_latency")
for c in (1, 16, 64):
    t = tandem("throughput", workload="write_256b", clients=c)
    line(f"writes/s, {c} clients", t, "writes_per_second", False,
         lambda r, c=c: r["figure"] == "throughput" and r.get("clients") == c)
t = tandem("failover")
line("failover p50 s (kill -9)", t, "p50_s", True, lambda r: r["figure"] == "failover")
lost = [f"{r.get('system', 'tandem')}: {r['lost_acknowledged']} of {r['acknowledged_writes']}" for r in rows
        if r.get("figure") == "failover" and "lost_acknowledged" in r]
print("acknowledged writes lost across the failovers: " + ", ".join(lost))
PY
