#!/usr/bin/env bash
# The CPU part of examples/llama3-70b-trn1: continual pretraining from an HF
# folder under a tp·pp plan on Slurm, a rank killed mid-run and the job
# restarted from its latest checkpoint by `autopart launch --resume auto`
# (NxD's auto-resume flow at CPU size), then the weights exported back to an
# HF folder that transformers loads.
#
#   examples/llama3-70b-trn1/run.sh     # about 2 minutes on 2 cores; needs root for Slurm
source "$(dirname "${BASH_SOURCE[0]}")/../common.sh"

texts=(/usr/share/common-licenses/{GPL-3,GPL-2,LGPL-2.1,Apache-2.0,MPL-2.0})

step "1. Text data, and an HF checkpoint (the stand-in for a downloaded Llama 3: GQA 4:1, llama3 rope scaling)"
show autopart data train-tokenizer --input "${texts[@]}" --vocab-size 512 --out work/tokenizer.json
show autopart data prepare --tokenizer work/tokenizer.json --input "${texts[@]}" --seq-len 128 --out work/data
show autopart data prepare --tokenizer work/tokenizer.json --input /usr/share/common-licenses/Artistic --seq-len 128 --out work/held-out
show "$py" ../hf.py make config-mini.json work/Llama-3-mini --tokenizer work/tokenizer.json

step "2. A tp2·pp2 plan for the HF model (its single kv head copied for each tp rank, as NxD's kv_size_multiplier)"
show autopart compile --model work/Llama-3-mini/config.json --cluster cpu --dtype fp32 --seq-len 128 --global-batch 8 \
  --plan-ngpus 4 --tp 2 --pp 2 --micro-batch 2 --schedule 1f1b --out work/tp2pp2

step "3. The job on Slurm: rank 1 is killed after step 6, autopart launch restarts it from step_4"
show bash ../../scripts/slurm.sh start
eval "$(bash ../../scripts/slurm.sh env)"
# A test hook: SIGKILL rank 1 after step 6, in the first attempt only.
export AUTOPART_FAULT_KILL_AT_STEP=1:6
show sbatch --wait job-cpu.sbatch
unset AUTOPART_FAULT_KILL_AT_STEP
cat work/job.log >&2
show autopart ckpt inspect work/ck

step "4. The same 12 steps uninterrupted, for comparison"
show mpirun -np 4 autopart run work/tp2pp2 --init-from work/Llama-3-mini --data work/data \
  --steps 12 --lr 3e-3 --warmup 2 --metrics work/uninterrupted.jsonl

step "5. Back to HuggingFace: export, and the held-out loss in transformers and in autopart"
show autopart ckpt export work/ck/step_12 --hf work/Llama-3-mini-trained
show "$py" ../hf.py rows work/held-out 4 work/rows.json
show autopart eval --init-from work/ck/step_12 --data work/rows.json --json --plan-dir work/eval-plan | tee work/eval.json
show "$py" ../hf.py loss work/Llama-3-mini-trained work/rows.json | tee work/Llama-3-mini-eval.json

step "Checks"
"$py" - work/train.jsonl work/uninterrupted.jsonl work/job.log work/eval.json work/Llama-3-mini-eval.json <<'PY'
import json, sys

train, ref, log, ours, theirs = sys.argv[1:]
rows = lambda p: [json.loads(l) for l in open(p) if l.strip()]
a, b = rows(train), rows(ref)
assert [m["step"] for m in a] == list(range(1, 13)), [m["step"] for m in a]
assert [m["loss"] for m in a] == [m["loss"] for m in b], "the restarted job's losses are the uninterrupted run's, bitwise"
print(f"restarted job = uninterrupted run, 12 of 12 losses bitwise; {a[0]['loss']:.3f} -> {a[-1]['loss']:.3f}")
assert a[-1]["loss"] < a[0]["loss"] - 0.5, "continual pretraining lowers the loss"
text = open(log).read()
assert "restart" in text.lower(), "the job log shows launch's restart"
x, y = json.load(open(ours))["loss"], json.load(open(theirs))["loss"]
print(f"held-out loss: autopart {x:.6f}, transformers on the exported folder {y:.6f}")
assert abs(x - y) < 1e-4 * abs(y), "the export is the trained model"
PY
echo "llama3-70b-trn1 CPU part: OK" >&2
