#!/usr/bin/env bash
# The main job: installs what is missing, builds autopart, and traces a
# preset (Llama 3 8B at batch 1 x 8192 tokens), printing its summary.
# Extra arguments replace the default ones: scripts/main.sh --model llama2-70b --json
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/setup.sh
source scripts/env.sh
args=("$@")
[ ${#args[@]} -eq 0 ] && args=(--model llama3-8b)
cargo run --quiet --release -p autopart -- trace "${args[@]}"
