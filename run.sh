#!/usr/bin/env bash
# One-command set-up on a fresh machine, then run.
#   bash run.sh demo   -> install softrank and run the demo on scikit-learn's digits
#   bash run.sh test   -> install softrank with its test/plots/distributed/docs extras and the
#                         cross-check libraries, run pytest
# Extra arguments are passed to the demo / to pytest.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
what=${1:-test}; shift || true

pip_install() { "$PY" -m pip install --disable-pip-version-check -q "$@"; }

# torch first and pinned: an unpinned torch (or anything requiring torchvision) pulls a
# multi-GB CUDA build. A CPU wheel of 2.13.0 lies on this kind of machine's disk.
"$PY" -c "import torch" 2>/dev/null || pip_install "torch==2.13.0"

case "$what" in
  demo)
    pip_install -e .
    exec "$PY" -m softrank demo "$@"
    ;;
  test)
    pip_install -e ".[test,plots,distributed,docs]"
    # Cross-check libraries without their dependencies (they require torchvision), plus the
    # small dependencies they really import.
    pip_install --no-deps backpack-for-pytorch==1.7.1 curvlinops-for-pytorch==3.0.1 \
        nngeometry==0.4 einops==0.8.2 unfoldNd==0.2.3 einconv==0.1.0 linear_operator==0.6.1 || \
      echo "warning: cross-check libraries could not be installed; their tests will skip"
    exec "$PY" -m pytest "$@"
    ;;
  *)
    echo "usage: bash run.sh {demo|test} [args...]" >&2; exit 2 ;;
esac
