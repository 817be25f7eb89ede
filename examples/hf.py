"""HuggingFace side of the examples, with transformers itself (the venv's
python: .venv/bin/python examples/hf.py ...).

  hf.py make CONFIG.json OUT_DIR [--tokenizer tokenizer.json]
      a LlamaForCausalLM of that config with transformers' initialisation
      (seed 0), saved with save_pretrained (model.safetensors): the stand-in
      for a checkpoint downloaded from the Hub, which these machines cannot
      reach. The tokenizer, if given, is copied in as tokenizer.json.
  hf.py rows DATA_DIR N OUT.json
      the first N rows of an `autopart data prepare` folder as
      {"input_ids": [[...], ...]} (what `autopart eval --data` reads).
  hf.py loss HF_DIR ROWS.json
      transformers' mean next-token loss over those rows (labels=input_ids,
      every row's predicted tokens together), printed as JSON {"loss": x}.
"""
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM


def make(config, out, tokenizer=None):
    torch.manual_seed(0)
    cfg = LlamaConfig(**json.load(open(config)))
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(out, safe_serialization=True)
    if tokenizer:
        shutil.copy(tokenizer, Path(out) / "tokenizer.json")
    n = sum(p.numel() for p in model.parameters())
    print(f"{out}: LlamaForCausalLM, {n:,} parameters, model.safetensors")


def rows(data, n, out):
    manifest = json.load(open(Path(data) / "manifest.json"))
    width = manifest["seq_len"] + 1
    dtype = np.uint16 if manifest["dtype"] == "u16" else np.uint32
    ids = np.fromfile(Path(data) / "tokens.bin", dtype=dtype).reshape(-1, width)
    json.dump({"input_ids": ids[:n].astype(int).tolist()}, open(out, "w"))


def loss(model_dir, rows_path):
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for row in json.load(open(rows_path))["input_ids"]:
            ids = torch.tensor([row])
            logits = model(ids).logits[0, :-1].float()
            total += torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum").item()
            count += len(row) - 1
    print(json.dumps({"loss": total / count, "tokens": count}))


if __name__ == "__main__":
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "make":
        tok = args[args.index("--tokenizer") + 1] if "--tokenizer" in args else None
        make(args[0], args[1], tok)
    elif cmd == "rows":
        rows(args[0], int(args[1]), args[2])
    elif cmd == "loss":
        loss(args[0], args[1])
    else:
        sys.exit(__doc__)
