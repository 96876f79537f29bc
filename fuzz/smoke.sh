#!/usr/bin/env bash
# Builds every fuzz target and runs each briefly (FUZZ_SECONDS, default 20),
# failing on any crash. The long runs that README.md reports use
#   cargo +nightly fuzz run <target> -- -max_total_time=600
set -euo pipefail
cd "$(dirname "$0")"

seconds="${FUZZ_SECONDS:-20}"
if ! cargo +nightly --version >/dev/null 2>&1; then
  echo "fuzz smoke: the nightly toolchain is missing (rustup toolchain install nightly)" >&2
  exit 1
fi
command -v cargo-fuzz >/dev/null 2>&1 || cargo install cargo-fuzz --locked --quiet
# Unoptimised: quicker to build on a fresh machine, fast enough for a smoke run.
cargo +nightly fuzz build --dev
for target in $(cargo +nightly fuzz list); do
  mkdir -p "corpus/$target" "artifacts/$target"
  printf 'fuzz %-14s ' "$target"
  if ! cargo +nightly fuzz run --dev "$target" "corpus/$target" -- \
      -max_total_time="$seconds" -max_len=4096 -artifact_prefix="artifacts/$target/" \
      >"artifacts/$target.log" 2>&1; then
    echo "CRASHED"
    tail -n 40 "artifacts/$target.log" >&2
    exit 1
  fi
  grep -E '^Done [0-9]+ runs' "artifacts/$target.log" | tail -n 1
done
