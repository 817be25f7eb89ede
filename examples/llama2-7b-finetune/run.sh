#!/usr/bin/env bash
# The CPU part of examples/llama2-7b-finetune: NxD's Llama 2 fine-tuning
# flow at CPU size. A tiny Llama 2 (multi-head attention, rope theta 1e4)
# from an HF folder, Dolly-format instruction data prepared with a loss mask
# (prompts count nothing), fine-tuned under tp2 with ZeRO-1 over dp2 (4
# processes), then the eval split's response loss and ROUGE before and
# after, and a sampled response.
#
#   examples/llama2-7b-finetune/run.sh  # about 2 minutes on 2 cores
source "$(dirname "${BASH_SOURCE[0]}")/../common.sh"

step "1. A tokenizer, Dolly-format records and the HF checkpoint to fine-tune"
show autopart data train-tokenizer --input /usr/share/common-licenses/{GPL-3,Apache-2.0,MPL-2.0} \
  --vocab-size 320 --out work/tokenizer.json
show "$py" make_dolly.py work/dolly-train.jsonl work/dolly-eval.jsonl
show "$py" ../hf.py make config-mini.json work/Llama-2-mini --tokenizer work/tokenizer.json

step "2. Instruction rows: packed for training, one padded row a record for eval"
show autopart data prepare --tokenizer work/tokenizer.json --format instruction --template template.txt \
  --input work/dolly-train.jsonl --seq-len 40 --pack --out work/sft
show autopart data prepare --tokenizer work/tokenizer.json --format instruction --template template.txt \
  --input work/dolly-eval.jsonl --seq-len 40 --out work/sft-eval

step "3. Fine-tune under tp2 with ZeRO-1 over dp2"
show autopart compile --model work/Llama-2-mini/config.json --cluster cpu --dtype fp32 --seq-len 40 --global-batch 16 \
  --plan-ngpus 2 --tp 2 --runtime-ngpus 4 --zero 1 --out work/tp2-zero1
show mpirun -np 4 autopart run work/tp2-zero1 --init-from work/Llama-2-mini --data work/sft \
  --eval-data work/sft-eval --eval-every 50 --steps 200 --lr 3e-3 --warmup 10 \
  --checkpoint-dir work/ck --metrics work/sft.jsonl

step "4. Evaluate before and after: response loss, ROUGE of greedy responses"
show autopart eval --init-from work/Llama-2-mini --data work/sft-eval --rouge --json --plan-dir work/eval-plan \
  --generations work/gen-before.jsonl | tee work/before.json
show autopart eval --init-from work/ck/step_200 --data work/sft-eval --rouge --json --plan-dir work/eval-plan \
  --generations work/gen-after.jsonl | tee work/after.json

step "5. Responses to new prompts: greedy (as JSON), then sampled"
show autopart generate --init-from work/ck/step_200 --tokenizer work/tokenizer.json \
  --prompt $'Q: repeat ocean (cabin ocean)\nA: ' --max-new-tokens 12 --plan-dir work/gen-plan --json | tee work/greedy.json
show autopart generate --init-from work/ck/step_200 --tokenizer work/tokenizer.json \
  --prompt $'Q: repeat lemon\nA: ' --max-new-tokens 8 --temperature 0.7 --top-p 0.9 --seed 0 --plan-dir work/gen-plan

step "Checks"
"$py" - work/before.json work/after.json work/sft.jsonl work/greedy.json <<'PY'
import json, sys
greedy = json.load(open(sys.argv[4]))
print(f"greedy: {greedy['text']!r}, ids {greedy['new_ids']}")
# The checkpoint's config says EOS is 0: generation stops there.
assert greedy["new_ids"][-1] == 0 and 0 not in greedy["new_ids"][:-1], "generation stops at the checkpoint's EOS"
assert "ocean" in greedy["text"], greedy

before, after = json.load(open(sys.argv[1])), json.load(open(sys.argv[2]))
m = [json.loads(l) for l in open(sys.argv[3]) if l.strip()]
print(f"eval split, response loss: {before['loss']:.3f} -> {after['loss']:.3f}; "
      f"ROUGE-1 {before['rouge1']:.3f} -> {after['rouge1']:.3f}, ROUGE-L {before['rougeL']:.3f} -> {after['rougeL']:.3f}")
assert after["loss"] < before["loss"] - 1.0, "fine-tuning lowers the held-out response loss"
assert after["rougeL"] > before["rougeL"] + 0.3, "fine-tuning raises ROUGE-L"
assert all(0 < r["loss_tokens"] < 16 * 40 for r in m), "prompts are masked: fewer labels count than the rows hold"
evals = [r["eval_loss"] for r in m if r.get("eval_loss") is not None]
assert len(evals) >= 3 and evals[-1] < evals[0], evals
PY
echo "llama2-7b-finetune CPU part: OK" >&2
