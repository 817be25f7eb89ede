#!/usr/bin/env bash
# Installs everything autopart needs on a fresh Debian machine, idempotently:
#   - Debian packages: OpenMPI (runtime collectives), clang/libclang (rsmpi bindgen),
#     Slurm (slurmctld, slurmd, slurm-client) and munge for the single-node Slurm of
#     the tests (scripts/slurm.sh)
#   - a project-local Python venv (.venv) with PyTorch 2.11.0 (libtorch for `tch`)
#     and z3-solver (libz3 for the plan search)
# Re-running it when everything is present takes about a second.
# Usage: scripts/setup.sh [--compiler-only]   (--compiler-only skips torch/MPI)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv"
torch_version="2.11.0"
z3_version="5.4.0.0"
# The reference for the HF parity tests (tests/tests/hf.rs): tiny checkpoints
# are made and checked with transformers itself.
transformers_version="5.24.0"
# The TensorBoard test reads event files back with TensorBoard's own reader.
tensorboard_version="2.21.0"
# autopart eval --rouge is checked against Google's rouge-score.
rouge_score_version="0.1.2"
compiler_only=0
[ "${1:-}" = "--compiler-only" ] && compiler_only=1

log() { echo "[setup] $*" >&2; }

sudo_cmd=""
[ "$(id -u)" -ne 0 ] && sudo_cmd="sudo"

need_pkgs=()
pkgs=(python3-venv)
[ $compiler_only -eq 0 ] && pkgs+=(libopenmpi-dev openmpi-bin libclang-dev clang slurmctld slurmd slurm-client munge)
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || need_pkgs+=("$p")
done
if [ ${#need_pkgs[@]} -gt 0 ]; then
  log "installing Debian packages: ${need_pkgs[*]}"
  export DEBIAN_FRONTEND=noninteractive
  $sudo_cmd apt-get update -qq
  $sudo_cmd apt-get install -y -qq "${need_pkgs[@]}" >/dev/null
fi

if [ ! -x "$venv/bin/python" ]; then
  log "creating virtual environment $venv"
  python3 -m venv "$venv" 2>/dev/null || { python3 -m pip install -q virtualenv && python3 -m virtualenv -q "$venv"; }
fi
py="$venv/bin/python"

have() { "$py" -m pip show "$1" 2>/dev/null | awk '/^Version:/{print $2}'; }

if [ "$(have z3-solver)" != "$z3_version" ]; then
  log "installing z3-solver $z3_version"
  "$py" -m pip install -q --disable-pip-version-check "z3-solver==$z3_version"
fi
if [ $compiler_only -eq 0 ] && [ "$(have torch)" != "$torch_version" ]; then
  log "installing torch $torch_version (a few minutes on a fresh machine)"
  "$py" -m pip install -q --disable-pip-version-check "torch==$torch_version"
fi
if [ $compiler_only -eq 0 ] && [ "$(have transformers)" != "$transformers_version" ]; then
  log "installing transformers $transformers_version (the HF parity tests' reference)"
  "$py" -m pip install -q --disable-pip-version-check "transformers==$transformers_version"
fi
if [ $compiler_only -eq 0 ] && [ "$(have tensorboard)" != "$tensorboard_version" ]; then
  log "installing tensorboard $tensorboard_version (the event-file test's reader)"
  "$py" -m pip install -q --disable-pip-version-check "tensorboard==$tensorboard_version"
fi
if [ $compiler_only -eq 0 ] && [ "$(have rouge-score)" != "$rouge_score_version" ]; then
  log "installing rouge-score $rouge_score_version (the ROUGE test's reference)"
  "$py" -m pip install -q --disable-pip-version-check "rouge-score==$rouge_score_version"
fi
log "ready: $venv"
