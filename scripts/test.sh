#!/usr/bin/env bash
# Runs every test of the workspace on a fresh or prepared machine:
# installs what is missing (scripts/setup.sh), then the test suites.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/setup.sh
source scripts/env.sh
# One build from scratch: incremental caches only cost disk (GBs) here.
export CARGO_INCREMENTAL=0
# The fuzz tests draw the same cases on every run (a random seed turned CI
# red on inputs unrelated to the change); explore with another seed, e.g.
# PROPTEST_RNG_SEED=$RANDOM PROPTEST_CASES=30000 cargo nextest run ...
export PROPTEST_RNG_SEED="${PROPTEST_RNG_SEED:-20261201}"
# tests/tests/slurm.rs starts a single-node Slurm (scripts/slurm.sh); stop it
# afterwards unless it was already running.
if ! pgrep -x slurmctld >/dev/null 2>&1; then
  trap 'bash scripts/slurm.sh stop >/dev/null 2>&1 || true' EXIT
fi
echo "[test] cargo fmt --check" >&2
cargo fmt --all -- --check
echo "[test] cargo clippy --workspace --all-targets -- -D warnings" >&2
cargo clippy --workspace --all-targets -- -D warnings
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --no-fail-fast
else
  cargo test --workspace --no-fail-fast
fi
