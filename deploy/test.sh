#!/usr/bin/env bash
# Runs every test of rouse: installs what is missing (idempotent), checks
# formatting and lints, builds the binaries the end-to-end tests start,
# smoke-runs the fuzz targets, and runs unit and end-to-end tests against
# real rqlited, PostgreSQL and Redis.
set -euo pipefail
cd "$(dirname "$0")/.."

./deploy/install-deps.sh
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
cargo build --workspace --bins
# A short run of every fuzz target (parsers of hostile input), before the
# test runner so that its summary closes the output.
./fuzz/smoke.sh
if command -v cargo-nextest >/dev/null 2>&1; then
  cargo nextest run --workspace --no-fail-fast
else
  cargo test --workspace --no-fail-fast
fi
