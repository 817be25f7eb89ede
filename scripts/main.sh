#!/usr/bin/env bash
# The main job: installs what is missing, builds autopart, traces a preset
# (Llama 3 8B) and compiles a parallel plan for it on 8 A100s, writing
# out/plan.ron and out/report.md.
# Extra arguments replace the default compile arguments:
#   scripts/main.sh --model llama3-70b --plan-ngpus 64 --global-batch 512
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/setup.sh
source scripts/env.sh
cargo build --quiet --release -p autopart
args=("$@")
if [ ${#args[@]} -eq 0 ]; then
  ./target/release/autopart trace --model llama3-8b
  echo
  args=(--model llama3-8b --plan-ngpus 8 --out out)
fi
./target/release/autopart compile "${args[@]}"
