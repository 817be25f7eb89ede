"""Reads the TensorBoard event files in a folder with TensorBoard's own
reader and prints every scalar as JSON: {tag: [[step, value], ...]}.

Used by tests/tests/data_run.rs to check `--tensorboard` against the JSONL
metrics. Usage: tb_read.py DIR
"""

import json
import sys

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def main() -> None:
    acc = EventAccumulator(sys.argv[1], size_guidance={"scalars": 0})
    acc.Reload()
    out = {
        tag: [[e.step, e.value] for e in acc.Scalars(tag)]
        for tag in acc.Tags()["scalars"]
    }
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
