#!/usr/bin/env bash
# Memory benchmark: for one CPU-sized Llama (benches/memory/llama-1024x8.json)
# under several plans, compiles each plan, trains it 3 steps under mpirun and
# compares the peak resident memory of each rank above its baseline (VmHWM
# minus VmRSS just before the model is built, from the metrics file) with the
# plan's predicted peak (plan.ron, prediction.stages[k].memory). Prints one
# table row per plan (and per stage for pipeline plans) with the predicted
# breakdown; the target is |error| <= 10%.
#
#   scripts/memory_bench.sh [--out DIR] [--steps N] [--only NAME[,NAME..]] [--list] [--report]
#
# --report prints the table of the plans already measured in DIR (after
# runs with --only, say) without compiling or running anything.
#
# Needs `cargo build -p autopart` first (the autopart binary is taken from
# $CARGO_TARGET_DIR or target/); plan binaries are built in release. The
# table goes to stdout and DIR/table.txt, progress lines to stderr.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=scripts/env.sh
source "$root/scripts/env.sh"
target="${CARGO_TARGET_DIR:-$root/target}"
autopart="${AUTOPART:-$target/debug/autopart}"
model="$root/benches/memory/llama-1024x8.json"
out="${TMPDIR:-/tmp}/autopart-memory-bench"
steps=3
only=""
report=0

# Every plan shares these: the CPU cluster, 4 sequences of 256 tokens per
# step (activations are a third of the single-rank peak), fp32 unless the
# plan's flags name a --dtype.
common=(--cluster cpu --seq-len 256 --global-batch 4 --build-profile release)

# name | plan GPUs | the plan's flags (every dimension fixed, so the
# search only evaluates it) | the model under benches/memory/ when not the
# default (a GQA copy with 2 kv heads for tp beyond the kv heads; a GPT
# with tied embeddings for the tied stages).
plans=(
  "1gpu|1|--tp 1 --pp 1 --dp 1 --micro-batch 4 --recompute none --zero 0"
  "1gpu-selective|1|--tp 1 --pp 1 --dp 1 --micro-batch 4 --recompute selective --zero 0"
  "1gpu-full|1|--tp 1 --pp 1 --dp 1 --micro-batch 4 --recompute full --zero 0"
  "dp2|2|--tp 1 --pp 1 --dp 2 --micro-batch 2 --recompute none --zero 0"
  "dp2-zero1|2|--tp 1 --pp 1 --dp 2 --micro-batch 2 --recompute none --zero 1"
  "dp2-zero2|2|--tp 1 --pp 1 --dp 2 --micro-batch 2 --recompute none --zero 2"
  "dp2-zero3|2|--tp 1 --pp 1 --dp 2 --micro-batch 2 --recompute none --zero 3"
  "dp2-zero3-full|2|--tp 1 --pp 1 --dp 2 --micro-batch 2 --recompute full --zero 3"
  "1gpu-bf16|1|--tp 1 --pp 1 --dp 1 --micro-batch 4 --recompute none --zero 0 --dtype bf16"
  "dp2-zero1-bf16|2|--tp 1 --pp 1 --dp 2 --micro-batch 2 --recompute none --zero 1 --dtype bf16"
  "tp2|2|--tp 2 --pp 1 --dp 1 --micro-batch 4 --recompute none --zero 0 --sp false"
  "tp2-sp|2|--tp 2 --pp 1 --dp 1 --micro-batch 4 --recompute none --zero 0 --sp true"
  "tp2-selective|2|--tp 2 --pp 1 --dp 1 --micro-batch 4 --recompute selective --zero 0 --sp false"
  "tp2-full|2|--tp 2 --pp 1 --dp 1 --micro-batch 4 --recompute full --zero 0 --sp false"
  "pp2-1f1b|2|--tp 1 --pp 2 --dp 1 --micro-batch 1 --schedule 1f1b --recompute none --zero 0"
  "pp2-gpipe|2|--tp 1 --pp 2 --dp 1 --micro-batch 1 --schedule gpipe --recompute none --zero 0"
  "tp4|4|--tp 4 --pp 1 --dp 1 --micro-batch 4 --recompute none --zero 0 --sp false"
  "tp4-kv-copies|4|--tp 4 --pp 1 --dp 1 --micro-batch 4 --recompute none --zero 0 --sp false|llama-1024x8-kv2.json"
  "gpt-pp2-tied|2|--tp 1 --pp 2 --dp 1 --micro-batch 1 --schedule 1f1b --recompute none --zero 0|gpt-1024x8.json"
)

while [[ $# -gt 0 ]]; do
  case "$1" in
    --out) out="$2"; shift 2 ;;
    --steps) steps="$2"; shift 2 ;;
    --only) only=",$2,"; shift 2 ;;
    --list) for p in "${plans[@]}"; do echo "${p%%|*}"; done; exit 0 ;;
    --report) report=1; shift ;;
    -h|--help) sed -n 2,18p "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "error: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done

if [[ ! -x "$autopart" ]]; then
  echo "error: $autopart not found: run \`cargo build -p autopart\` first" >&2
  exit 1
fi
mkdir -p "$out"
say() { echo "[memory-bench $(date +%H:%M:%S)] $*" >&2; }

names=()
for p in "${plans[@]}"; do
  IFS='|' read -r name ngpus flags model_file <<<"$p"
  plan_model="$model"
  if [[ -n "$model_file" ]]; then plan_model="$root/benches/memory/$model_file"; fi
  if [[ -n "$only" && "$only" != *",$name,"* ]]; then continue; fi
  names+=("$name")
  if [[ $report == 1 ]]; then continue; fi
  dir="$out/$name"
  rm -rf "$dir"
  mkdir -p "$dir"
  say "$name: compiling (--plan-ngpus $ngpus $flags)"
  # shellcheck disable=SC2086 # $flags is a list of words
  dtype=(--dtype fp32)
  if [[ " $flags " == *" --dtype "* ]]; then dtype=(); fi
  if ! "$autopart" compile --model "$plan_model" --plan-ngpus "$ngpus" $flags "${dtype[@]}" "${common[@]}" \
      --out "$dir" >"$dir/compile.log" 2>&1; then
    say "$name: compile failed (see $dir/compile.log)"
    tail -5 "$dir/compile.log" >&2
    continue
  fi
  say "$name: training $steps steps on $ngpus ranks"
  if ! mpirun --allow-run-as-root --oversubscribe --bind-to none -np "$ngpus" \
      "$autopart" run "$dir" --steps "$steps" --metrics "$dir/metrics.jsonl" \
      >"$dir/run.log" 2>&1; then
    say "$name: run failed (see $dir/run.log)"
    tail -5 "$dir/run.log" >&2
    continue
  fi
  say "$name: $(tail -1 "$dir/run.log")"
done

python3 - "$out" "${names[@]}" <<'PY' | tee "$out/table.txt"
"""The table: measured peak over baseline against the predicted peak."""
import json
import re
import sys

out, names = sys.argv[1], sys.argv[2:]
MIB = 1 << 20
PARTS = ["params", "grads", "optimizer", "activations", "transient", "allocator"]


def prediction(text):
    """Per-stage memory breakdowns and the mesh of a plan.ron."""
    stages = []
    for m in re.finditer(r"memory: \((.*?)\)", text, re.S):
        fields = dict(re.findall(r"(\w+)_bytes: (\d+)", m.group(1)))
        stages.append({k: int(fields.get(k, 0)) for k in PARTS})
    mesh = {k: int(re.search(rf"\b{k}: (\d+)", text).group(1)) for k in ("tp", "dp", "pp")}
    return stages, mesh


rows = []
for name in names:
    try:
        with open(f"{out}/{name}/plan.ron") as f:
            stages, mesh = prediction(f.read())
        with open(f"{out}/{name}/metrics.jsonl") as f:
            lines = [json.loads(l) for l in f if l.strip()]
    except (OSError, ValueError, AttributeError, KeyError) as e:
        rows.append((name, None, None, None, f"failed: {e}"))
        continue
    last = lines[-1]
    per_rank = last.get("rank_peaks_over_baseline_bytes") or []
    # World rank -> pp stage: tp innermost, then dp, then pp.
    inner = mesh["tp"] * mesh["dp"]
    entries = [(name, last["rss_over_baseline_bytes"], max(stages, key=lambda s: sum(s.values())))]
    if len(stages) > 1 and per_rank:
        for k, st in enumerate(stages):
            ranks = [b for r, b in enumerate(per_rank) if r // inner == k]
            entries.append((f"  stage {k}", max(ranks), st))
    for label, measured, st in entries:
        predicted = sum(st.values())
        err = (predicted - measured) / measured * 100
        rows.append((label, measured, predicted, err, st))

head = f"{'plan':<16} {'measured MiB':>12} {'predicted MiB':>13} {'error':>7}  {'<=10%':<5}  " + \
    "predicted: " + " / ".join({"optimizer": "opt", "activations": "act", "transient": "trans", "allocator": "alloc"}.get(p, p) for p in PARTS) + " (MiB)"
print(head)
print("-" * len(head))
hits = total = 0
for label, measured, predicted, err, st in rows:
    if measured is None:
        print(f"{label:<16} {st}")
        continue
    ok = abs(err) <= 10
    if not label.startswith(" "):
        total += 1
        hits += ok
    parts = " / ".join(f"{st[p] / MIB:.0f}" for p in PARTS)
    print(f"{label:<16} {measured / MIB:>12.0f} {predicted / MIB:>13.0f} {err:>+6.1f}%  "
          f"{'yes' if ok else 'NO':<5}  {parts}")
print(f"\n{hits} of {total} plans within 10% (measured: max over ranks of VmHWM - baseline VmRSS; "
      "predicted: max over stages; error = (predicted - measured) / measured)")
PY
