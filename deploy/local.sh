#!/usr/bin/env bash
# Starts the local rouse stack on configs/local.yaml (data in ./data) and
# prints how to connect. Ctrl-C stops it; the data stays for the next start.
set -euo pipefail
cd "$(dirname "$0")/.."

./deploy/install-deps.sh
cargo build --workspace --bins --quiet
bin=./target/debug
config=configs/local.yaml
api=$(sed -n 's/^  api_addr: *//p' "$config" | head -n 1)

"$bin/rouse-control" --config "$config" serve &
control=$!
trap 'kill -TERM $control 2>/dev/null || true; wait $control 2>/dev/null || true' EXIT INT TERM

for _ in $(seq 1 150); do
  curl -fsS "http://$api/healthz" >/dev/null 2>&1 && break
  kill -0 $control 2>/dev/null || { echo "rouse-control did not start; see the log above" >&2; exit 1; }
  sleep 0.2
done

cat <<MSG

rouse is running: control API http://$api, data in ./data, config $config.

  $bin/rouse-control app create myapp             # an app (tenant)
  $bin/rouse-control key create myapp             # its API key, shown once
  $bin/rouse-control user create myapp alice --password secret
  $bin/rouse-control db create myapp users        # rqlite; --engine postgres for PostgreSQL
  $bin/rouse-control db list                      # status and leader address
  $bin/rouse-control db hibernate myapp users     # or wait for the idle timeout
  $bin/rouse-control db wake myapp users

rqlite clients connect to the leader address \`db list\` shows; PostgreSQL
clients to postgres://alice:secret@<address>/users. Metrics: http://$api/metrics
Ctrl-C stops rouse and every database it runs.
MSG
wait $control
