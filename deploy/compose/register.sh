#!/bin/sh
# One-shot setup of docker-compose.yml, run by the service `rouse-init` in
# the rouse-control image: registers the Patroni cluster with rouse-control
# as database `postgres` of app `shop`, and makes the login `alice` of that
# app. Then, through the proxy's protocol-aware PostgreSQL front:
#   psql "postgres://alice.shop:$SHOP_PASSWORD@127.0.0.1:5433/postgres"   # the leader
#   psql "postgres://alice.shop:$SHOP_PASSWORD@127.0.0.1:5434/postgres"   # a replica
# It also gives the proxy its control token (role proxy) in
# $ROUSE_PROXY_TOKEN_DIR/proxy, a volume only the proxy mounts besides this
# service. The admin token comes from control's data directory.
# Running it again changes nothing but alice's password.
set -eu

: "${ROUSE_CONTROL_URL:=http://rouse-control:8001}"
: "${ROUSE_ADMIN_PASSWORD:?the Patroni superuser password}"
: "${ROUSE_PASSWORD:?the password of login alice}"
export ROUSE_CONTROL_URL ROUSE_ADMIN_PASSWORD ROUSE_PASSWORD

retry() {
  n=0
  until "$@"; do
    n=$((n + 1))
    [ "$n" -lt 60 ] || { echo "register.sh: giving up on: $*" >&2; return 1; }
    sleep 2
  done
}

retry rouse-control nodes >/dev/null

if ! out=$(rouse-control app create shop 2>&1); then
  case "$out" in
    *already*) ;;
    *) echo "$out" >&2; exit 1 ;;
  esac
fi

# The cluster needs a leader before control can make the app's roles there.
if ! rouse-control db status shop postgres >/dev/null 2>&1; then
  retry rouse-control db register-patroni shop postgres \
    --member pg1=172.30.0.21:5432,http://pg1:8008 \
    --member pg2=172.30.0.22:5432,http://pg2:8008 \
    --member pg3=172.30.0.23:5432,http://pg3:8008 \
    --admin-user postgres
fi

retry rouse-control user create shop alice >/dev/null

: "${ROUSE_PROXY_TOKEN_DIR:=/proxy-token}"
if [ ! -s "$ROUSE_PROXY_TOKEN_DIR/proxy" ]; then
  token=$(rouse-control token create --role proxy | sed -n 's/.*"token": "\(.*\)".*/\1/p')
  umask 077
  printf '%s' "$token" > "$ROUSE_PROXY_TOKEN_DIR/proxy.new"
  # The proxy runs as another user of its own image: it may read, no one else.
  chmod 0444 "$ROUSE_PROXY_TOKEN_DIR/proxy.new"
  mv "$ROUSE_PROXY_TOKEN_DIR/proxy.new" "$ROUSE_PROXY_TOKEN_DIR/proxy"
fi
echo "registered: postgres://alice.shop:...@rouse-proxy:5433/postgres (read-write), :5434 (read-only)"
