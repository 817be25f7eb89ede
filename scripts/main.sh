#!/usr/bin/env bash
# The main job, on a fresh or prepared machine:
#  1. installs what is missing and builds autopart;
#  2. compiles Llama 3 8B for 8 A100s: plan, report, lowered program and the
#     generated plan binary (out/llama3-8b/);
#  3. compiles llama-mini for 2 CPU ranks and trains it end to end for 40
#     steps on a generated token file under `mpirun -np 2 autopart run`
#     (out/llama-mini/, metrics in metrics.jsonl).
# Extra arguments replace step 2's compile arguments:
#   scripts/main.sh --model llama3-70b --plan-ngpus 64 --global-batch 512 --out out/70b
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/setup.sh
source scripts/env.sh
echo "[main] building autopart" >&2
cargo build --quiet --release -p autopart
autopart=./target/release/autopart

args=("$@")
if [ ${#args[@]} -eq 0 ]; then
  "$autopart" trace --model llama3-8b
  echo
  args=(--model llama3-8b --plan-ngpus 8 --out out/llama3-8b)
fi
echo "[main] autopart compile ${args[*]}" >&2
"$autopart" compile "${args[@]}"

echo
echo "[main] llama-mini on 2 CPU ranks, end to end" >&2
"$autopart" compile --model llama-mini --plan-ngpus 2 --cluster cpu --dtype fp32 \
  --seq-len 64 --global-batch 16 --out out/llama-mini
# A learnable token stream (each token determines the next), in the u16
# .bin format `--data` reads: the loss falls from ln(256) = 5.5 towards 0.
python3 -c "
import struct, sys
t, out = 1, bytearray()
for _ in range(65536):
    out += struct.pack('<H', t)
    t = (5 * t + 3) % 256
open(sys.argv[1], 'wb').write(out)
" out/llama-mini/tokens.bin
mpirun --allow-run-as-root --oversubscribe --bind-to none -np 2 \
  "$autopart" run out/llama-mini --steps 40 --lr 3e-3 --warmup 4 \
  --data out/llama-mini/tokens.bin --metrics out/llama-mini/metrics.jsonl
