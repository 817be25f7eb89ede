"""The peer of scripts/peer_bench.sh: HF transformers + PyTorch training the
same Llama as autopart's plan, under torchrun (DDP over gloo for more than
one process), fp32, AdamW with autopart's defaults (lr 3e-4 warm-up free,
weight decay 0.01, eps 1e-8, clipping at 1.0), one intra-op thread per
process, random tokens. Prints one JSON line on rank 0: the median step time
of the timed steps and the tokens per second of the whole job.

    torchrun --nproc-per-node N scripts/peer_hf.py --config CONFIG.json \
        --seq-len 256 --global-batch 8 --steps 4
"""

import argparse
import json
import os
import statistics
import time

import torch
import torch.distributed as dist
from transformers import LlamaConfig, LlamaForCausalLM


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", required=True, help="an HF config.json")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--global-batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=4, help="the first is warm-up, not timed")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if args.global_batch % world:
        raise SystemExit(f"--global-batch {args.global_batch} does not split over {world} processes")
    torch.set_num_threads(args.threads)
    if world > 1:
        dist.init_process_group("gloo")
    with open(args.config) as f:
        config = LlamaConfig(**json.load(f))
    config.attn_implementation = "sdpa"
    torch.manual_seed(7)
    model = LlamaForCausalLM(config)
    model.train()
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.01, eps=1e-8)
    rows = args.global_batch // world
    gen = torch.Generator().manual_seed(7 + rank)
    times = []
    for step in range(args.steps):
        tokens = torch.randint(0, config.vocab_size, (rows, args.seq_len), generator=gen)
        if world > 1:
            dist.barrier()
        t0 = time.perf_counter()
        out = model(input_ids=tokens, labels=tokens)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if world > 1:
            dist.barrier()
        dt = time.perf_counter() - t0
        if step > 0:
            times.append(dt)
        if rank == 0:
            print(f"[hf] step {step + 1}/{args.steps}: {dt:.2f} s, loss {out.loss.item():.4f}", flush=True)
    if rank == 0:
        step_s = statistics.median(times)
        print(json.dumps({
            "framework": "hf",
            "processes": world,
            "step_s": step_s,
            "tokens_per_s": args.global_batch * args.seq_len / step_s,
        }))
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
