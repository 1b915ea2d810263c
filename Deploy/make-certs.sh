#!/usr/bin/env bash
# Makes a cluster CA and one certificate per site, with the site id in the subject
# alternative name (what peers check), using the openssl command line.
#
#   Deploy/make-certs.sh DIR SITE [SITE...]
#
# Writes DIR/ca.pem and DIR/ca.key (keep ca.key offline once the sites have their
# certificates) and DIR/SITE.pem, DIR/SITE.key for each site. An existing CA in DIR is
# reused, so the same command adds a site or renews a certificate (see Deploy/README.md
# for rotation without downtime).
set -euo pipefail
dir=${1:?usage: make-certs.sh DIR SITE [SITE...]}
shift
[ $# -ge 1 ] || { echo "usage: make-certs.sh DIR SITE [SITE...]" >&2; exit 2; }
mkdir -p "$dir"
cd "$dir"
days=${TANDEM_CERT_DAYS:-825}

if [ ! -f ca.pem ] || [ ! -f ca.key ]; then
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
    -keyout ca.key -out ca.pem -days 3650 -subj "/CN=Tandem cluster CA" 2>/dev/null
  chmod 600 ca.key
  echo "made the cluster CA: $dir/ca.pem"
fi

for site in "$@"; do
  case "$site" in
    *[!a-z0-9.-]*|"") echo "make-certs: site id '$site' must be lowercase letters, digits, '.' or '-'" >&2; exit 2 ;;
  esac
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
    -keyout "$site.key.tmp" -out "$site.csr" -subj "/CN=$site" 2>/dev/null
  printf 'subjectAltName=DNS:%s\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage=serverAuth,clientAuth\n' "$site" > "$site.ext"
  openssl x509 -req -in "$site.csr" -CA ca.pem -CAkey ca.key -CAcreateserial \
    -out "$site.pem.tmp" -days "$days" -sha256 -extfile "$site.ext" 2>/dev/null
  chmod 600 "$site.key.tmp"
  # Replace key and certificate together, each by rename (a reader never sees half a file).
  mv "$site.key.tmp" "$site.key"
  mv "$site.pem.tmp" "$site.pem"
  rm -f "$site.csr" "$site.ext"
  echo "made $dir/$site.pem (SAN DNS:$site, $days days)"
done
