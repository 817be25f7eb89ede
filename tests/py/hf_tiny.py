"""Tiny HuggingFace checkpoints and transformers' own losses, for the HF
parity tests (tests/tests/hf.rs). Run with the project venv's python.

  hf_tiny.py make llama|llama-tied|gpt2 OUT [--shard-bytes N] [--config-style 4|5]
  hf_tiny.py loss DIR TOKENS SEQ BATCH   # prints transformers' loss on step 0's batch
  hf_tiny.py loss-rows DIR ROWS.json     # transformers' mean loss over {"input_ids": [[...], ...]} rows
  hf_tiny.py generate DIR IDS N          # greedy generate(do_sample=False) of N new ids after IDS (1,2,3); prints them as JSON
  hf_tiny.py tokenizer OUT               # a word-level tokenizer.json of 40 words (ids below 64)
  hf_tiny.py encode TOK TEXT | decode TOK IDS   # prints the ids (JSON) / the text
  hf_tiny.py compare A B                 # from_pretrained both; prints the tensor count if all are equal
  hf_tiny.py drop DIR NAME               # rewrites DIR/model.safetensors without NAME
"""
import json
import sys

import numpy as np
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM


def make(kind, out, shard_bytes=None, style="5"):
    torch.manual_seed(0)
    if kind.startswith("llama"):
        cfg = LlamaConfig(
            hidden_size=64,
            intermediate_size=176,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            vocab_size=256,
            max_position_embeddings=64,
            rms_norm_eps=1e-5,
            # Llama 3.1's scaling, with a short original context so that
            # the 16-dim heads' frequencies fall in all three of its bands.
            rope_theta=500000.0,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16,
            },
            tie_word_embeddings=kind == "llama-tied",
            bos_token_id=1,
            eos_token_id=2,
        )
        model = LlamaForCausalLM(cfg)
    else:
        cfg = GPT2Config(
            n_embd=64,
            n_layer=2,
            n_head=4,
            vocab_size=256,
            n_positions=64,
            layer_norm_epsilon=1e-5,
            bos_token_id=0,
            eos_token_id=0,
        )
        model = GPT2LMHeadModel(cfg)
    # Norm weights and biases away from their 1 / 0 initial values, so a
    # wrong mapping of any of them changes the loss.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
            else:
                p.mul_(2.0)
    kwargs = {"safe_serialization": True}
    if shard_bytes:
        kwargs["max_shard_size"] = int(shard_bytes)
    model.save_pretrained(out, **kwargs)
    if style == "4" and kind.startswith("llama"):
        # transformers 4.x's form: rope_theta and rope_scaling at the top.
        path = f"{out}/config.json"
        c = json.load(open(path))
        rope = c.pop("rope_parameters")
        c["rope_theta"] = rope.pop("rope_theta")
        c["rope_scaling"] = rope
        json.dump(c, open(path, "w"), indent=2)


def windows(tokens_path, seq, batch):
    ids = np.fromfile(tokens_path, dtype="<u2").astype(np.int64)
    n = (len(ids) - 1) // seq
    rows = [ids[(r % n) * seq:(r % n) * seq + seq + 1] for r in range(batch)]
    return torch.tensor(np.stack(rows))


def loss(d, tokens_path, seq, batch):
    cls = GPT2LMHeadModel if json.load(open(f"{d}/config.json"))["model_type"] == "gpt2" else LlamaForCausalLM
    model = cls.from_pretrained(d, attn_implementation="eager", dtype=torch.float32)
    model.eval()
    x = windows(tokens_path, int(seq), int(batch))
    with torch.no_grad():
        out = model(input_ids=x, labels=x)
    print(repr(float(out.loss)))


def logits(d, tokens_path, seq, batch, path):
    # transformers' logits on the first `batch` windows of the token file
    # (what `autopart eval --logits` writes for the first batch), against
    # the file's: the largest difference and the largest logit, as JSON.
    from safetensors.numpy import load_file
    got = load_file(path)["logits"]
    x = windows(tokens_path, int(seq), int(batch))[:, :-1]
    with torch.no_grad():
        want = model_of(d)(input_ids=x).logits.numpy()
    if got.shape != want.shape:
        print(json.dumps({"error": f"shape {list(got.shape)} vs transformers' {list(want.shape)}"}))
        return
    print(json.dumps({"max_abs_diff": float(np.abs(got - want).max()), "max_abs": float(np.abs(want).max())}))


def model_of(d):
    cls = GPT2LMHeadModel if json.load(open(f"{d}/config.json"))["model_type"] == "gpt2" else LlamaForCausalLM
    model = cls.from_pretrained(d, attn_implementation="eager", dtype=torch.float32)
    model.eval()
    return model


def loss_rows(d, rows_path):
    # Rows of any length, right-padded: the padding's labels are -100, and
    # causal attention keeps it out of the real positions.
    rows = json.load(open(rows_path))["input_ids"]
    n = max(len(r) for r in rows)
    ids = torch.tensor([r + [0] * (n - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (n - len(r)) for r in rows])
    labels = ids.masked_fill(mask == 0, -100)
    with torch.no_grad():
        out = model_of(d)(input_ids=ids, attention_mask=mask, labels=labels)
    print(repr(float(out.loss)))


def generate(d, ids, n):
    prompt = torch.tensor([[int(x) for x in ids.split(",")]])
    with torch.no_grad():
        out = model_of(d).generate(prompt, max_new_tokens=int(n), do_sample=False)
    print(json.dumps(out[0, prompt.shape[1]:].tolist()))


WORDS = ("the a cat dog sat ran on under mat tree and then it was big small red blue "
         "fast slow house garden bird sang sun moon over near happy sad old new one two "
         "three saw ate fish bread water").split()


def tokenizer(out):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for w in WORDS:
        vocab[w] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece()
    tok.save(out)


if __name__ == "__main__":
    cmd = sys.argv[1]
    if cmd == "make":
        args = sys.argv[2:]
        shard = None
        style = "5"
        if "--shard-bytes" in args:
            i = args.index("--shard-bytes")
            shard = args[i + 1]
            del args[i:i + 2]
        if "--config-style" in args:
            i = args.index("--config-style")
            style = args[i + 1]
            del args[i:i + 2]
        make(args[0], args[1], shard, style)
    elif cmd == "drop":
        # Rewrites DIR/model.safetensors without tensor NAME.
        from safetensors.torch import load_file, save_file
        d, name = sys.argv[2], sys.argv[3]
        t = load_file(f"{d}/model.safetensors")
        del t[name]
        save_file(t, f"{d}/model.safetensors", metadata={"format": "pt"})
    elif cmd == "compare":
        # Loads both folders with from_pretrained; every tensor must be equal.
        a, b = sys.argv[2], sys.argv[3]
        def load(d):
            cls = GPT2LMHeadModel if json.load(open(f"{d}/config.json"))["model_type"] == "gpt2" else LlamaForCausalLM
            return cls.from_pretrained(d, dtype=torch.float32).state_dict()
        sa, sb = load(a), load(b)
        if sorted(sa) != sorted(sb):
            sys.exit(f"different tensors: {sorted(set(sa) ^ set(sb))}")
        bad = [k for k in sa if not torch.equal(sa[k], sb[k])]
        if bad:
            sys.exit(f"tensors differ: {bad}")
        print(len(sa))
    elif cmd == "loss":
        loss(*sys.argv[2:6])
    elif cmd == "logits":
        logits(*sys.argv[2:7])
    elif cmd == "loss-rows":
        loss_rows(*sys.argv[2:4])
    elif cmd == "generate":
        generate(*sys.argv[2:5])
    elif cmd == "tokenizer":
        tokenizer(sys.argv[2])
    elif cmd == "encode":
        from tokenizers import Tokenizer
        print(json.dumps(Tokenizer.from_file(sys.argv[2]).encode(sys.argv[3]).ids))
    elif cmd == "decode":
        from tokenizers import Tokenizer
        ids = [int(x) for x in sys.argv[3].split(",") if x]
        print(Tokenizer.from_file(sys.argv[2]).decode(ids, skip_special_tokens=True))
    else:
        sys.exit(f"unknown command {cmd}")
