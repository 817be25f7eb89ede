#!/usr/bin/env bash
# Step-time benchmark: how well a profiled cluster file predicts this
# machine. For each process count (1, 2, 4) it runs `autopart profile`
# under mpirun (the figures of a launch of that many processes: CPU ranks
# share cores and memory bandwidth), then compiles each plan of the list
# with that cluster file, trains it a few steps and compares the measured
# step time (median of the steps after the first; 4 steps of the 1024x8
# Llama, 20 of llama-mini, or --steps N of each) with the plan's predicted
# step time (plan.ron, prediction.step_s). It ends with the pairs of plans
# whose measured times differ by more than 15% that the prediction orders
# the other way. Prints one table row per plan; the target is |error| <= 15%.
#
#   scripts/time_bench.sh [--out DIR] [--steps N] [--only NAME[,NAME..]] [--list] [--report] [--quick-profile]
#
# Needs `cargo build --release -p autopart` first. The table goes to stdout
# and DIR/table.txt, progress lines to stderr.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=scripts/env.sh
source "$root/scripts/env.sh"
target="${CARGO_TARGET_DIR:-$root/target}"
autopart="${AUTOPART:-$target/release/autopart}"
big="$root/benches/memory/llama-1024x8.json"
out="${TMPDIR:-/tmp}/autopart-time-bench"
steps=""
only=""
report=0
quick=()

# name | processes | model | the plan's flags (every dimension fixed).
# The 1024x8 Llama trains 4 sequences of 256 tokens per step in fp32;
# llama-mini 8 sequences of 128.
plans=(
  "big-1|1|$big|--seq-len 256 --global-batch 4 --tp 1 --pp 1 --dp 1 --micro-batch 4 --recompute none --zero 0"
  "big-1-full|1|$big|--seq-len 256 --global-batch 4 --tp 1 --pp 1 --dp 1 --micro-batch 4 --recompute full --zero 0"
  "big-1-mb1|1|$big|--seq-len 256 --global-batch 4 --tp 1 --pp 1 --dp 1 --micro-batch 1 --recompute none --zero 0"
  "big-dp2|2|$big|--seq-len 256 --global-batch 4 --tp 1 --pp 1 --dp 2 --micro-batch 2 --recompute none --zero 0"
  "big-dp2-zero3|2|$big|--seq-len 256 --global-batch 4 --tp 1 --pp 1 --dp 2 --micro-batch 2 --recompute none --zero 3"
  "big-tp2|2|$big|--seq-len 256 --global-batch 4 --tp 2 --pp 1 --dp 1 --micro-batch 4 --recompute none --zero 0 --sp false"
  "big-pp2|2|$big|--seq-len 256 --global-batch 4 --tp 1 --pp 2 --dp 1 --micro-batch 1 --schedule 1f1b --recompute none --zero 0"
  "big-dp4|4|$big|--seq-len 256 --global-batch 4 --tp 1 --pp 1 --dp 4 --micro-batch 1 --recompute none --zero 1"
  "big-tp2-dp2|4|$big|--seq-len 256 --global-batch 4 --tp 2 --pp 1 --dp 2 --micro-batch 2 --recompute none --zero 0 --sp false"
  "mini-1|1|llama-mini|--seq-len 128 --global-batch 8 --tp 1 --pp 1 --dp 1 --micro-batch 8 --recompute none --zero 0"
  "mini-dp2|2|llama-mini|--seq-len 128 --global-batch 8 --tp 1 --pp 1 --dp 2 --micro-batch 4 --recompute none --zero 0"
  "mini-tp2|2|llama-mini|--seq-len 128 --global-batch 8 --tp 2 --pp 1 --dp 1 --micro-batch 8 --recompute none --zero 0 --sp false"
  "mini-pp2|2|llama-mini|--seq-len 128 --global-batch 8 --tp 1 --pp 2 --dp 1 --micro-batch 2 --schedule 1f1b --recompute none --zero 0"
  "mini-dp4|4|llama-mini|--seq-len 128 --global-batch 8 --tp 1 --pp 1 --dp 4 --micro-batch 2 --recompute none --zero 1"
)

while [[ $# -gt 0 ]]; do
  case "$1" in
    --out) out="$2"; shift 2 ;;
    --steps) steps="$2"; shift 2 ;;
    --only) only=",$2,"; shift 2 ;;
    --list) for p in "${plans[@]}"; do echo "${p%%|*}"; done; exit 0 ;;
    --report) report=1; shift ;;
    --quick-profile) quick=(--quick); shift ;;
    -h|--help) sed -n 2,15p "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "error: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done

if [[ ! -x "$autopart" ]]; then
  echo "error: $autopart not found: run \`cargo build --release -p autopart\` first" >&2
  exit 1
fi
mkdir -p "$out"
say() { echo "[time-bench $(date +%H:%M:%S)] $*" >&2; }
mpi=(mpirun --allow-run-as-root --oversubscribe --bind-to none)

names=()
for p in "${plans[@]}"; do
  IFS='|' read -r name np model flags <<<"$p"
  if [[ -n "$only" && "$only" != *",$name,"* ]]; then continue; fi
  names+=("$name")
  if [[ $report == 1 ]]; then continue; fi
  cluster="$out/profile-np$np.ron"
  if [[ ! -f "$cluster" ]]; then
    say "profiling on $np processes"
    "${mpi[@]}" -np "$np" "$autopart" profile --out "$cluster" "${quick[@]}" >"$out/profile-np$np.txt" 2>"$out/profile-np$np.log" \
      || { say "profile failed (see $out/profile-np$np.log)"; tail -5 "$out/profile-np$np.log" >&2; exit 1; }
  fi
  dir="$out/$name"
  rm -rf "$dir"
  mkdir -p "$dir"
  say "$name: compiling (--plan-ngpus $np $flags)"
  # shellcheck disable=SC2086 # $flags is a list of words
  if ! "$autopart" compile --model "$model" --plan-ngpus "$np" $flags --dtype fp32 \
      --cluster "$cluster" --out "$dir" >"$dir/compile.log" 2>&1; then
    say "$name: compile failed (see $dir/compile.log)"
    tail -5 "$dir/compile.log" >&2
    continue
  fi
  # A llama-mini step is tens of milliseconds, as noisy as the machine:
  # 20 of them (the median of 19) cost a second; the 1024x8 Llama's take 4.
  n="${steps:-$([[ $name == mini-* ]] && echo 20 || echo 4)}"
  say "$name: training $n steps on $np processes"
  if ! "${mpi[@]}" -np "$np" "$autopart" run "$dir" --steps "$n" --metrics "$dir/metrics.jsonl" \
      >"$dir/run.log" 2>&1; then
    say "$name: run failed (see $dir/run.log)"
    tail -5 "$dir/run.log" >&2
    continue
  fi
  say "$name: $(tail -1 "$dir/run.log")"
done

python3 - "$out" "${names[@]}" <<'PY' | tee "$out/table.txt"
"""The table: measured step time against the profiled prediction."""
import json
import re
import statistics
import sys

out, names = sys.argv[1], sys.argv[2:]
rows = []
for name in names:
    try:
        with open(f"{out}/{name}/plan.ron") as f:
            text = f.read()
        predicted = float(re.search(r"\bstep_s: ([0-9.e+-]+)", text).group(1))
        with open(f"{out}/{name}/metrics.jsonl") as f:
            steps = [json.loads(l)["step_s"] for l in f if l.strip()]
        measured = statistics.median(steps[1:] if len(steps) > 1 else steps)
    except (OSError, ValueError, AttributeError, KeyError) as e:
        print(f"{name:<14} failed: {e}")
        continue
    rows.append((name, measured, predicted, (predicted - measured) / measured * 100))

print(f"{'plan':<14} {'measured s':>10} {'predicted s':>11} {'error':>7}  <=15%")
print("-" * 53)
for name, m, p, e in rows:
    print(f"{name:<14} {m:>10.3f} {p:>11.3f} {e:>+6.1f}%  {'yes' if abs(e) <= 15 else 'NO'}")
hits = sum(abs(e) <= 15 for *_, e in rows)
errs = sorted(abs(e) for *_, e in rows)
if errs:
    print(f"\n{hits} of {len(rows)} plans within 15%; median |error| {statistics.median(errs):.1f}%, worst {errs[-1]:.1f}%")
wrong = []
for i, (a, ma, pa, _) in enumerate(rows):
    for b, mb, pb, _ in rows[i + 1:]:
        if max(ma, mb) / min(ma, mb) > 1.15 and (ma < mb) != (pa < pb):
            wrong.append(f"{a} vs {b}")
print(f"pairs measured more than 15% apart that the prediction orders the other way: "
      f"{len(wrong)}" + (f" ({', '.join(wrong)})" if wrong else ""))
PY
