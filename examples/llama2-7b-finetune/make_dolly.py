"""Dolly-format instruction records (databricks-dolly-15k's fields:
instruction, context, response, category) that a tiny model can learn in a
minute: each asks to repeat a word, sometimes with a context. Records whose
word pair index is a multiple of 7 form the eval split, the rest the train
split.

  make_dolly.py TRAIN.jsonl EVAL.jsonl
"""
import json
import sys

WORDS = ["apple", "river", "stone", "cloud", "green", "seven", "north", "quiet", "light", "bread",
         "paper", "music", "glass", "ocean", "tiger", "honey", "storm", "cabin", "lemon", "field"]

train, held = open(sys.argv[1], "w"), open(sys.argv[2], "w")
for i in range(len(WORDS) ** 2):
    a, b = WORDS[i % len(WORDS)], WORDS[i // len(WORDS)]
    rec = {
        "instruction": f"repeat {a}",
        "context": None if i % 3 == 0 else f"{b} {a}",
        "response": f"{a} {a}",
        "category": "open_qa",
    }
    (held if i % 7 == 0 else train).write(json.dumps(rec) + "\n")
