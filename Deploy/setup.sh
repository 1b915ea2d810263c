#!/usr/bin/env bash
# Installs the system libraries Tandem builds against, when they are missing:
# liblz4-dev (LZ4), libssl-dev (OpenSSL 3: TLS, SHA-256), libsqlite3-dev (SQLite with the
# session extension), pkg-config, and the openssl, curl and haproxy commands (certificates,
# the local cluster, the load-balancer fire drill). Needs root for apt-get; otherwise prints the command.
set -euo pipefail

needed=()
for pkg in liblz4-dev libssl-dev libsqlite3-dev pkg-config openssl curl haproxy; do
  if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed"; then
    needed+=("$pkg")
  fi
done

if ! command -v swift >/dev/null 2>&1; then
  echo "setup: swift is not on PATH; install Swift 6 (swift.org) first." >&2
  exit 1
fi

if [ ${#needed[@]} -eq 0 ]; then
  exit 0
fi

if [ "$(id -u)" -eq 0 ]; then
  echo "setup: installing ${needed[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null
  apt-get install -y -qq "${needed[@]}" >/dev/null
else
  echo "setup: missing ${needed[*]}. Run:" >&2
  echo "  sudo apt-get update && sudo apt-get install -y ${needed[*]}" >&2
  exit 1
fi
