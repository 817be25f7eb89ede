"""What `autopart compile` printed, as the examples' plans.sh keep it in
outputs/NAME.txt, read back into numbers for their summary.md tables.

    from compile_output import read
    r = read("outputs/chunked-ce.txt")
    r["step_s"], r["tokens_s"], r["per_gpu"], r["mfu"], r["peak"], r["cap"], r["need"]
    r["tp"], r["pp"], r["dp"], r["schedule"], r["zero"], r["config"], r["recompute"], r["kv"]
    r["batch"], r["n_micro"], r["micro"], r["error"]

A plan that was not found has `step_s` None, `need` the GiB per device its
stage needed (when memory was why) and `error` the message.
"""
import re
from pathlib import Path


def _num(s):
    return float(s.replace(",", ""))


def read(path):
    text = Path(path).read_text()
    r = {"text": text}
    pred = re.search(
        r"predicted: step ([\d.,]+) (m?s), ([\d,]+) tokens/s \(([\d,]+) per GPU\), MFU ([\d.]+)%", text
    )
    r["step_s"] = pred and _num(pred.group(1)) / (1000 if pred.group(2) == "ms" else 1)
    r["step_text"] = pred and pred.group(1)
    r["tokens_s"] = pred and pred.group(3)
    r["per_gpu"] = pred and pred.group(4)
    r["mfu"] = pred and pred.group(5)
    peak = re.search(r"peak memory: ([\d.]+) of ([\d.]+) GiB", text)
    r["peak"] = peak and float(peak.group(1))
    r["peak_text"] = peak and f"{peak.group(1)} of {peak.group(2)} GiB"
    r["cap"] = peak and float(peak.group(2))
    need = re.search(r"needs ([\d.]+) GiB per device", text)
    r["need"] = need and float(need.group(1))
    cfg = re.search(r"config: ((tp=(\d+) pp=(\d+) dp=(\d+)) .*schedule (\S+), ZeRO (\d).*)", text)
    r["config"] = cfg and cfg.group(1)
    r["mesh"] = cfg and cfg.group(2)
    r["tp"], r["pp"], r["dp"] = (cfg.group(3), cfg.group(4), cfg.group(5)) if cfg else (None,) * 3
    r["schedule"] = cfg and cfg.group(6)
    r["zero"] = cfg and cfg.group(7)
    rec = re.search(r"recompute: (.*)", text)
    r["recompute"] = rec and rec.group(1)
    kv = re.search(r"kv heads: each copied (\d+) times", text)
    r["kv"] = kv and kv.group(1)
    batch = re.search(r"batch: (\d+) sequences .*\((\d+) micro-batches of (\d+)\)", text)
    r["batch"] = batch and int(batch.group(1))
    r["n_micro"] = batch and batch.group(2)
    r["micro"] = batch and batch.group(3)
    err = re.search(r"error: (.*)", text)
    r["error"] = err and err.group(1)
    return r
