#!/usr/bin/env bash
# Starts the local rouse stack (control + proxy) on configs/local.yaml, data
# in ./data, and prints how to connect. Ctrl-C stops it; the data stays.
set -euo pipefail
cd "$(dirname "$0")/.."

./deploy/install-deps.sh
cargo build --workspace --bins --quiet
bin=./target/debug
config=configs/local.yaml
setting() { sed -n "s/^  $1: *//p" "$config" | head -n 1; }
api=$(setting api_addr)
http=$(setting http_addr)

pids=()
trap 'kill -TERM "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true' EXIT INT TERM
wait_for() { # url pid name
  for _ in $(seq 1 150); do
    curl -fsS "$1" >/dev/null 2>&1 && return 0
    kill -0 "$2" 2>/dev/null || { echo "$3 did not start; see the log above" >&2; exit 1; }
    sleep 0.2
  done
  echo "$3 did not answer at $1" >&2; exit 1
}

# The local stack stops its databases with it (in production they outlive control).
ROUSE_CONTROL__STOP_ENGINES_ON_EXIT=true "$bin/rouse-control" --config "$config" serve & pids+=($!)
wait_for "http://$api/healthz" "${pids[0]}" rouse-control
"$bin/rouse-proxy" --config "$config" serve & pids+=($!)
wait_for "http://$(setting stats_addr)/healthz" "${pids[1]}" rouse-proxy

ctl="$bin/rouse-control --config $config"
$ctl app create demo >/dev/null 2>&1 || true
key=$($ctl key create demo | sed -n 's/.*"key": "\(.*\)".*/\1/p')

cat <<MSG

rouse is running: proxy http://$http, control http://$api, data in ./data.
App "demo" has a new API key: $key

  # the gateway API (the database is created on first use)
  curl -H "X-API-Key: $key" -d '{"database":"notes","sql":"CREATE TABLE notes (body TEXT)"}' http://$http/v1/database/exec
  curl -H "X-API-Key: $key" -d '{"database":"notes","sql":"INSERT INTO notes VALUES (?)","args":["hello"]}' http://$http/v1/database/exec
  curl -H "X-API-Key: $key" -d '{"database":"notes","sql":"SELECT * FROM notes"}' http://$http/v1/database/query
  # rqlite's own API, routed by path prefix
  curl -H "X-API-Key: $key" -d '["SELECT * FROM notes"]' http://$http/demo/notes/db/query

  # PostgreSQL through the proxy (the database wakes on connect)
  $bin/rouse-control user create demo alice --password secret
  $bin/rouse-control db create demo pg --engine postgres
  psql "postgres://alice.demo:secret@$(setting postgres_addr)/pg"

  $bin/rouse-control db list                     # status of every database
  $bin/rouse-control db hibernate demo notes     # the next request wakes it

Control API tokens: ./data/tokens/admin (rouse-control reads it) and ./data/tokens/proxy.
Stats page: http://$(setting stats_addr)/ (open it in a browser)
Metrics: http://$(setting stats_addr)/metrics (proxy), http://$api/metrics (control).
Ctrl-C stops rouse and every database it runs.
MSG
wait
