# Environment for building and running autopart against the project-local
# venv made by scripts/setup.sh. Source it: `source scripts/env.sh`.
_autopart_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
_venv="$_autopart_root/.venv"
export PATH="$_venv/bin:$PATH"
# tch/torch-sys: take libtorch from the venv's PyTorch.
export LIBTORCH_USE_PYTORCH=1
# z3 (plan search): the z3-solver wheel's libz3 and headers.
export Z3_NO_PKG_CONFIG=1
export Z3_SYS_Z3_VERSION=5.4.0
export Z3_LIBRARY_PATH_OVERRIDE="$_venv/lib/python3.11/site-packages/z3/lib"
export Z3_SYS_Z3_HEADER="$_venv/lib/python3.11/site-packages/z3/include/z3.h"
# mpirun as root (CI and these machines run as root); oversubscribe 2 cores.
export OMPI_ALLOW_RUN_AS_ROOT=1
export OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
export OMPI_MCA_rmaps_base_oversubscribe=1
unset _venv
