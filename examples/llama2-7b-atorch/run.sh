#!/usr/bin/env bash
# The CPU part of examples/llama2-7b-atorch: ATorch's three kinds of
# strategy for Llama 2 at CPU size on 4 processes: FSDP (ZeRO-3 over dp4,
# recompute), DeepSpeed-style 3D (fixed pp2 x dp2, ZeRO-1, recompute) and
# autopart's free search. Each trains the same 6 steps; the losses must
# agree (every plan computes the same model) and the table sets each plan's
# predicted step time and peak memory next to what it measured.
#
#   examples/llama2-7b-atorch/run.sh    # about 3 minutes on 2 cores
source "$(dirname "${BASH_SOURCE[0]}")/../common.sh"

common=(--model config-mini.json --cluster cpu --dtype fp32 --seq-len 256 --global-batch 8 --plan-ngpus 4)

step "1. FSDP: ZeRO-3 over dp4 with full recompute"
show autopart compile "${common[@]}" --tp 1 --pp 1 --dp 4 --zero 3 --recompute full --out work/fsdp
step "2. 3D, fixed: pp2 x dp2, ZeRO-1, full recompute"
show autopart compile "${common[@]}" --tp 1 --pp 2 --dp 2 --zero 1 --recompute full --out work/3d
step "3. Automatic: autopart's search on the cpu cluster"
show autopart compile "${common[@]}" --out work/auto

for plan in fsdp 3d auto; do
  step "Training $plan for 6 steps"
  show mpirun -np 4 autopart run work/$plan --steps 6 --seed 1 --metrics work/$plan.jsonl
done

step "Checks and the table"
"$py" - work <<'PY' | tee work/table.md
import json, re, sys
from pathlib import Path

work = Path(sys.argv[1])
rows = {}
def field(report, name, pat):
    return re.search(r"\| " + re.escape(name) + r"\s*\| " + pat, report).group(1)
for plan in ["fsdp", "3d", "auto"]:
    m = [json.loads(l) for l in open(work / f"{plan}.jsonl") if l.strip()]
    report = (work / plan / "report.md").read_text()
    step = re.search(r"\| step time\s*\| ([\d.,]+) (m?s)", report)
    pred_s = float(step.group(1).replace(",", "")) / (1000 if step.group(2) == "ms" else 1)
    peak_gib = float(field(report, "peak memory per GPU", r"([\d.]+) of"))
    num = r"(\d+)"
    layout = " ".join(
        f"{k}{field(report, n, num)}"
        for k, n in [("tp", "tensor parallel (tp)"), ("pp", "pipeline parallel (pp)"), ("dp", "data parallel (dp)")]
    )
    zero, recompute = field(report, "ZeRO", num), field(report, "recompute", r"(\w+)")
    layout += f", ZeRO-{zero}, recompute {recompute}"
    rows[plan] = (m, pred_s, peak_gib, layout)
base = [r["loss"] for r in rows["fsdp"][0]]
for plan, (m, *_ ) in rows.items():
    worst = max(abs(r["loss"] - b) / abs(b) for r, b in zip(m, base))
    assert len(m) == 6 and worst < 1e-5, f"{plan}: losses differ from FSDP's by {worst:.2e}"
print("| strategy | plan | predicted step | measured step (median, steps 2-6) | predicted peak | measured peak (rank 0, above baseline) |")
print("|---|---|---|---|---|---|")
for plan, (m, pred_s, peak, layout) in rows.items():
    steps = sorted(r["step_s"] for r in m[1:])
    med = steps[len(steps) // 2]
    rss = max(r["rss_over_baseline_bytes"] for r in m) / 2**20
    print(f"| {plan} | {layout} | {pred_s:.3f} s | {med:.3f} s | {peak * 1024:.0f} MiB | {rss:.0f} MiB |")
print("\nevery plan's 6 losses equal FSDP's within 1e-5 (relative)")
PY
echo "llama2-7b-atorch CPU part: OK" >&2
