#!/usr/bin/env bash
# Checkpoint benchmark: the CPU-sized Llama of benches/memory (1024 hidden,
# 8 layers, 111M parameters) on 2 processes (dp2, ZeRO-1), trained 6 steps
# four ways, all in one run of this script so the figures share a machine
# state:
#
#   none    no checkpoints (the reference step times)
#   sync    --checkpoint-every 2 (saves after steps 2, 4, 6)
#   async   the same with --async-checkpoint
#   resume  --resume 4 from the sync run's checkpoint, same plan, and
#           resume-tp2: the same checkpoint loaded by a tp2 plan (reshard)
#
# and prints a table (bytes, seconds training was blocked per save, seconds
# until each save was complete, load seconds, the step time of the steps
# that ran while an async save was being written against the same steps
# without checkpoints). The table goes to stdout and to docs/checkpoint.md
# with --doc.
#
#   scripts/ckpt_bench.sh [--out DIR] [--doc]
#
# Needs `cargo build -p autopart` first; plan binaries are built in release.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=scripts/env.sh
source "$root/scripts/env.sh"
target="${CARGO_TARGET_DIR:-$root/target}"
autopart="${AUTOPART:-$target/debug/autopart}"
model="$root/benches/memory/llama-1024x8.json"
out="${TMPDIR:-/tmp}/autopart-ckpt-bench"
doc=""

while [[ $# -gt 0 ]]; do
  case "$1" in
    --out) out="$2"; shift 2 ;;
    --doc) doc="$root/docs/checkpoint.md"; shift ;;
    -h|--help) sed -n 2,21p "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "error: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
if [[ ! -x "$autopart" ]]; then
  echo "error: $autopart not found: run \`cargo build -p autopart\` first" >&2
  exit 1
fi
say() { echo "[ckpt-bench $(date +%H:%M:%S)] $*" >&2; }
rm -rf "$out"
mkdir -p "$out"
common=(--model "$model" --cluster cpu --dtype fp32 --seq-len 256 --global-batch 4
  --build-profile release --plan-ngpus 2 --recompute none)
say "compiling dp2 ZeRO-1 and tp2"
"$autopart" compile "${common[@]}" --tp 1 --pp 1 --dp 2 --micro-batch 2 --zero 1 \
  --out "$out/dp2" >"$out/dp2.compile.log" 2>&1
"$autopart" compile "${common[@]}" --tp 2 --pp 1 --dp 1 --micro-batch 4 --zero 0 --sp false \
  --out "$out/tp2" >"$out/tp2.compile.log" 2>&1

train() { # name plan args...
  local name="$1" plan="$2"
  shift 2
  say "$name: $*"
  mpirun --allow-run-as-root --oversubscribe --bind-to none -np 2 \
    "$autopart" run "$out/$plan" --steps 6 --seed 1 --metrics "$out/$name.jsonl" "$@" \
    >"$out/$name.log" 2>&1 || { tail -20 "$out/$name.log" >&2; exit 1; }
}
train none dp2
train sync dp2 --checkpoint-dir "$out/ck-sync" --checkpoint-every 2
train async dp2 --checkpoint-dir "$out/ck-async" --checkpoint-every 2 --async-checkpoint
train resume dp2 --resume "$out/ck-sync/step_4"
train resume-tp2 tp2 --resume "$out/ck-sync/step_4"

python3 - "$out" <<'PY' | tee "$out/table.md"
import json, re, sys
out = sys.argv[1]
MIB = 1 << 20

def metrics(name):
    return [json.loads(l) for l in open(f"{out}/{name}.jsonl") if l.strip()]

none, sync, asyn = metrics("none"), metrics("sync"), metrics("async")
def saves(m):
    return [r for r in m if r.get("checkpoint_block_s") and r["step"] % 2 == 0]

def load_s(name):
    text = open(f"{out}/{name}.log").read()
    return float(re.search(r"resumed from .* in ([0-9.]+) s", text).group(1))

def saved(m):
    # Completed saves, by step: reported at the boundary where they completed.
    return {r["checkpoint_saved"]["step"]: r["checkpoint_saved"] for r in m if r.get("checkpoint_saved")}

print("Checkpoints of the 1024x8 Llama (111M parameters; params + AdamW moments, f32) on 2 processes,")
print("dp2 ZeRO-1, 4 x 256 tokens per step; `scripts/ckpt_bench.sh` (one run, one machine).\n")
s_saved, a_saved = saved(sync), saved(asyn)
step = sorted(s_saved)[0]
size = s_saved[step]["bytes"]
print(f"Checkpoint size: {size / MIB:.0f} MiB ({len(open(f'{out}/ck-sync/step_{step}/COMPLETE').read())} bytes of manifest).\n")
print("| | blocked per save (s) | writing, rank 0 (s) | complete after (s) | write MiB/s |")
print("|---|---:|---:|---:|---:|")
for name, m, done in (("sync", sync, s_saved), ("async", asyn, a_saved)):
    blocked = [r["checkpoint_block_s"] for r in m if r["step"] in (2, 4)]
    total = [done[k]["seconds"] for k in (2, 4) if k in done]
    write = [done[k]["write_s"] for k in (2, 4) if k in done]
    mean = lambda v: sum(v) / len(v) if v else float("nan")
    # Each rank writes half of the checkpoint.
    rate = size / 2 / MIB / mean(write)
    print(f"| {name} | {mean(blocked):.2f} | {mean(write):.2f} | {mean(total):.2f} | {rate:.0f} per rank |")
print()
print("| load | seconds | MiB/s |")
print("|---|---:|---:|")
for name, what in (("resume", "same plan (dp2 ZeRO-1)"), ("resume-tp2", "another plan (tp2, ZeRO-0)")):
    t = load_s(name)
    print(f"| {what} | {t:.2f} | {size / MIB / t:.0f} |")
print()
print("Step time (s) of the steps after a save, while the async save is written, against the")
print("same steps of the run without checkpoints (training compute only; the blocking is above):\n")
print("| step | no checkpoints | sync | async | async / none |")
print("|---:|---:|---:|---:|---:|")
extra = []
for k in (3, 5):
    n, s, a = (next(r["step_s"] for r in m if r["step"] == k) for m in (none, sync, asyn))
    extra.append(a - n)
    print(f"| {k} | {n:.2f} | {s:.2f} | {a:.2f} | {a / n:.2f} |")
sb = sum(r["checkpoint_block_s"] for r in sync if r["step"] in (2, 4)) / 2
ab = sum(r["checkpoint_block_s"] for r in asyn if r["step"] in (2, 4)) / 2
print()
print(f"Per save: sync holds training up {sb:.2f} s; async {ab:.2f} s (the copy at the step boundary),")
print(f"plus {sum(extra) / len(extra):.2f} s of slower training while the background write runs")
print("(here the writer thread shares 2 cores with the two ranks' compute, and the kernel writes")
print("the page cache back meanwhile: the sync run's next step is slower too). Not measured here:")
print("a machine with cores to spare for the writer, where the async cost should be the copy alone.")
PY
if [[ -n "$doc" ]]; then
  cp "$out/table.md" "$doc"
  say "wrote $doc"
fi
