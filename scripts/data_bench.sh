#!/usr/bin/env bash
# Data preparation benchmark: `autopart data prepare` throughput (MB of
# text per second, tokens per second) with --threads 1 and 2.
#
# The corpus is the license texts under /usr/share/common-licenses,
# concatenated repeatedly to about --mb megabytes (default 8), one
# paragraph a document (--doc-separator blank-line), and the same
# paragraphs as JSONL; the tokenizer is a byte-level BPE of 4096 ids trained
# on those texts (`autopart data train-tokenizer`). Each run's output is
# compared byte for byte with the threads-1 run's. The table goes to stdout,
# and into docs/data.md (between its bench markers) with --doc.
#
#   scripts/data_bench.sh [--mb N] [--out DIR] [--doc]
#
# Needs `cargo build -p autopart` first.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
target="${CARGO_TARGET_DIR:-$root/target}"
autopart="${AUTOPART:-$target/debug/autopart}"
out="${TMPDIR:-/tmp}/autopart-data-bench"
mb=8
doc=""

while [[ $# -gt 0 ]]; do
  case "$1" in
    --mb) mb="$2"; shift 2 ;;
    --out) out="$2"; shift 2 ;;
    --doc) doc="$root/docs/data.md"; shift ;;
    -h|--help) sed -n 2,15p "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "error: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
if [[ ! -x "$autopart" ]]; then
  echo "error: $autopart not found: run \`cargo build -p autopart\` first" >&2
  exit 1
fi
say() { echo "[data-bench $(date +%H:%M:%S)] $*" >&2; }
load_start="$(cut -d' ' -f1 /proc/loadavg)"
rm -rf "$out"
mkdir -p "$out"
licenses=()
for f in /usr/share/common-licenses/*; do
  [[ -f "$f" && ! -L "$f" ]] && licenses+=("$f")
done

say "corpus: ${#licenses[@]} license texts repeated to ${mb} MB"
: >"$out/corpus.txt"
while (( $(stat -c %s "$out/corpus.txt") < mb * 1000000 )); do
  for f in "${licenses[@]}"; do cat "$f"; printf '\n\n'; done >>"$out/corpus.txt"
done
python3 - "$out/corpus.txt" "$out/corpus.jsonl" <<'PY'
import json, sys
text = open(sys.argv[1], encoding="utf-8").read()
with open(sys.argv[2], "w", encoding="utf-8") as f:
    for p in text.split("\n\n"):
        if p.strip():
            f.write(json.dumps({"text": p}) + "\n")
PY
say "training the tokenizer"
"$autopart" data train-tokenizer --input "${licenses[@]}" --vocab-size 4096 \
  --out "$out/tokenizer.json" >/dev/null

rows=()
run() { # name threads input args...
  local name="$1" threads="$2" input="$3"
  shift 3
  say "$name, --threads $threads"
  "$autopart" data prepare --tokenizer "$out/tokenizer.json" --input "$input" \
    --seq-len 1024 --threads "$threads" --json --out "$out/$name-t$threads" "$@" \
    >"$out/$name-t$threads.json"
  local same="-"
  if [[ "$threads" != 1 ]]; then
    if cmp -s "$out/$name-t1/tokens.bin" "$out/$name-t$threads/tokens.bin" \
      && cmp -s "$out/$name-t1/manifest.json" "$out/$name-t$threads/manifest.json" \
      && cmp -s "$out/$name-t1/docs.bin" "$out/$name-t$threads/docs.bin"; then
      same="yes"
    else
      same="NO"
    fi
  fi
  rows+=("$(python3 - "$out/$name-t$threads.json" "$name" "$threads" "$same" <<'PY'
import json, sys
v = json.load(open(sys.argv[1]))
c = v["counts"]
print(f"| {sys.argv[2]} | {sys.argv[3]} | {v['input_bytes'] / 1e6:.1f} | {c['documents']} "
      f"| {c['tokens']} | {v['seconds']:.2f} | {v['mb_per_s']:.2f} | {v['tokens_per_s'] / 1e6:.2f} "
      f"| {sys.argv[4]} |")
PY
)")
}
for t in 1 2; do run text-paragraphs "$t" "$out/corpus.txt" --doc-separator blank-line; done
for t in 1 2; do run jsonl "$t" "$out/corpus.jsonl"; done

table="| input | threads | MB | documents | tokens | seconds | MB/s | M tokens/s | same bytes as threads 1 |
|---|---:|---:|---:|---:|---:|---:|---:|---|"
for r in "${rows[@]}"; do table+=$'\n'"$r"; done
load_before="$load_start"
machine="$(nproc) cores ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')), $(date -u +%Y-%m-%d), load average $load_before at the start (other work on the machine takes cores from --threads 2)"
echo "$table"
echo "$machine"
if [[ -n "$doc" ]]; then
  python3 - "$doc" "$table" "$machine" <<'PY'
import sys
path, table, machine = sys.argv[1:]
text = open(path).read()
start, end = "<!-- bench:start -->", "<!-- bench:end -->"
a, b = text.index(start) + len(start), text.index(end)
text = text[:a] + f"\n{table}\n\nMeasured on {machine} by `scripts/data_bench.sh --doc`.\n" + text[b:]
open(path, "w").write(text)
PY
  say "wrote $doc"
fi
