#!/usr/bin/env bash
# The CPU part of examples/llama3-8b-128k: nnScaler's debug flow at CPU size.
# A 4-layer model of Llama 3 8B's architecture (GQA 4:1, rope theta 5e5;
# width 128), data prepared from text, the loss as the chunked linear +
# cross-entropy op (chunks of 1024 tokens of 2048-token rows), plan 1 GPU /
# runtime 2 with ZeRO-1, checkpoints, a merge; then the same model with the
# built-in head on one process must give the same losses.
#
#   examples/llama3-8b-128k/run.sh      # about 2 minutes on 2 cores
source "$(dirname "${BASH_SOURCE[0]}")/../common.sh"

texts=(/usr/share/common-licenses/{GPL-3,GPL-2,LGPL-2.1,Apache-2.0,MPL-2.0,MPL-1.1,Artistic,GFDL-1.3})

step "1. A tokenizer trained on text the machine has, and rows of 2048 tokens"
show autopart data train-tokenizer --input "${texts[@]}" --vocab-size 2048 --out work/tokenizer.json
show autopart data prepare --tokenizer work/tokenizer.json --input "${texts[@]}" --seq-len 2048 --out work/data

step "2. Plan 1 GPU, run on 2 (data parallel, ZeRO-1), the loss as the chunked op"
show autopart compile --model config-mini.json --cluster cpu --dtype fp32 --seq-len 2048 --global-batch 2 \
  --plan-ngpus 1 --runtime-ngpus 2 --zero 1 \
  --annotations ../../annotations/examples/chunked_ce.ron --loss chunked_ce --out work/debug
show mpirun -np 2 autopart run work/debug --data work/data --steps 10 --lr 3e-3 --warmup 2 \
  --checkpoint-dir work/ck --checkpoint-every 5 --metrics work/debug.jsonl

step "3. The checkpoints, and one merged file"
show autopart ckpt inspect work/ck
show autopart ckpt inspect work/ck/step_10 --verify
show autopart ckpt merge work/ck/step_10 --out work/merged.safetensors

step "4. The same model with the built-in head, on one process"
show autopart compile --model config-mini.json --cluster cpu --dtype fp32 --seq-len 2048 --global-batch 2 \
  --plan-ngpus 1 --out work/plain
show autopart run work/plain --data work/data --steps 10 --lr 3e-3 --warmup 2 --metrics work/plain.jsonl

step "Checks"
"$py" - work/debug.jsonl work/plain.jsonl work/merged.safetensors config-mini.json <<'PY'
import json, sys
from safetensors.numpy import load_file
import numpy as np

debug, plain, merged, config = sys.argv[1:]
rows = lambda p: [json.loads(l) for l in open(p) if l.strip()]
a, b = rows(debug), rows(plain)
assert len(a) == len(b) == 10, (len(a), len(b))
worst = max(abs(x["loss"] - y["loss"]) / abs(y["loss"]) for x, y in zip(a, b))
print(f"chunked op on dp2 ZeRO-1 vs built-in head on 1 process: worst loss difference {worst:.2e} (relative)")
assert worst < 1e-4, "the chunked op under dp2 must compute the built-in head's losses"
print(f"loss {a[0]['loss']:.3f} -> {a[-1]['loss']:.3f} over 10 steps")
assert a[-1]["loss"] < a[0]["loss"] - 0.5, "the loss falls"
cfg = json.load(open(config))
t = load_file(merged)
layers = cfg["num_hidden_layers"]
assert len(t) == 3 + 9 * layers, sorted(t)
assert t["model.embed_tokens.weight"].shape == (cfg["vocab_size"], cfg["hidden_size"])
kv = cfg["hidden_size"] // cfg["num_attention_heads"] * cfg["num_key_value_heads"]
assert t["model.layers.0.self_attn.k_proj.weight"].shape == (kv, cfg["hidden_size"])
assert all(np.isfinite(v).all() for v in t.values())
print(f"merged: {len(t)} tensors, whole (unsharded), finite")
PY
echo "llama3-8b-128k CPU part: OK" >&2
