# Sourced by the benchmarks/gpu/run_*.sh scripts on the GPU machine: $OUT exists, the carried wheels in
# .gpu/whl are installed into /tmp/site, and the repo plus .gpu/site (packages copied from the venv) are importable.
set -u
OUT=${OUT:-/tmp/phalanx-gpu}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/whl/*.whl || exit 1
export PYTHONPATH=$PWD:$PWD/.gpu/site:/tmp/site PYTHONUNBUFFERED=1
