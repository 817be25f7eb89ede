# Sourced by each example's scripts (examples/*/run.sh, examples/*/plans.sh).
#
# - `autopart` on PATH: the caller's if it has one, else this tree's release
#   build (`cargo build --release -p autopart`); $AUTOPART names another.
# - mpirun as the examples' commands write it (`mpirun -np 2 autopart run
#   ...`): as root where the machine runs as root, more processes than
#   cores allowed, not pinned (a laptop or a 2-core CI machine).
# - The commands run in the example's folder and write under its `work/`
#   (emptied first; git ignores it), so that they read as the README has
#   them: `autopart data prepare ... --out work/data`.
# - `py`: this tree's venv python (transformers, safetensors), made by
#   scripts/setup.sh.
set -euo pipefail

example="$(cd "$(dirname "${BASH_SOURCE[1]}")" && pwd)"
root="$(cd "$example/../.." && pwd)"
if [[ -n "${AUTOPART:-}" ]]; then
  PATH="$(cd "$(dirname "$AUTOPART")" && pwd):$PATH"
elif ! command -v autopart >/dev/null 2>&1; then
  PATH="$root/target/release:$PATH"
fi
export PATH
if ! command -v autopart >/dev/null 2>&1; then
  echo "error: no autopart on PATH: run \`cargo build --release -p autopart\` (or set AUTOPART)" >&2
  exit 1
fi
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
export OMPI_MCA_rmaps_base_oversubscribe=1 OMPI_MCA_hwloc_base_binding_policy=none
py="$root/.venv/bin/python"
if [[ ! -x "$py" ]]; then
  echo "error: $py missing: run \`bash scripts/setup.sh\` first" >&2
  exit 1
fi

# plans.sh keeps its scratch apart (work-plans/), so that both can run at once.
if [[ "$(basename "${BASH_SOURCE[1]}")" == plans.sh ]]; then
  work="$example/work-plans"
else
  work="$example/work"
fi
rm -rf "$work"
mkdir -p "$work"
cd "$example"

# `step TEXT`: a heading in the example's output.
step() { printf '\n== %s\n' "$*" >&2; }

# `show CMD...`: prints the command as a user would type it, then runs it.
# The venv's python prints as `python`. The examples' READMEs quote these
# lines, and tests/tests/examples.rs checks that each README command is one
# the scripts printed.
show() {
  local shown=("$@")
  if [[ "${shown[0]}" == "$py" ]]; then
    shown[0]=python
  fi
  # Arguments with spaces or newlines are quoted as bash would take them.
  printf '$ %s' "${shown[0]}" >&2
  printf ' %q' "${shown[@]:1}" >&2
  printf '\n' >&2
  "$@"
}

# The GPU-cluster part (plans.sh): `plan NAME FLAGS...` compiles without
# building (`autopart compile FLAGS --no-build`) and keeps what it printed in
# $outputs/NAME.txt, the command first; "no plan fits" is a result too.
# `plans.sh` writes the checked-in outputs/; `plans.sh --check` writes
# work/outputs and fails if it differs from outputs/ (besides the search's
# own timing), which is how CI keeps the checked-in figures true.
outputs="$example/outputs"
if [[ "${1:-}" == --check ]]; then
  PLANS_CHECK=1
fi
if [[ "${PLANS_CHECK:-0}" == 1 ]]; then
  outputs="$work/outputs"
fi
plan() {
  local name="$1"
  shift
  mkdir -p "$outputs"
  printf '$ autopart compile %s\n\n' "$*" >"$outputs/$name.txt"
  printf '$ autopart compile %s\n' "$*" >&2
  if ! autopart compile "$@" --no-build --out "$work/plans/$name" >>"$outputs/$name.txt" 2>&1; then
    echo "(no plan: the command failed)" >>"$outputs/$name.txt"
  fi
  # The output folder is a scratch path; the search time is the machine's.
  sed -i -e "s#$work/plans/#work-plans/plans/#g" -e 's/ in [0-9.]* s$/ in (time) s/' "$outputs/$name.txt"
}

# After plans.sh wrote $outputs: under --check, compares them with the
# checked-in outputs/.
plans_done() {
  if [[ "${PLANS_CHECK:-0}" == 1 ]]; then
    if ! diff -ru "$example/outputs" "$outputs" >&2; then
      echo "error: $example/outputs is stale: rerun $(basename "$example")/plans.sh and commit outputs/" >&2
      exit 1
    fi
    echo "outputs/ are what plans.sh prints today" >&2
  fi
}
