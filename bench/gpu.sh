#!/usr/bin/env bash
# The GPU numbers in one run (fits a 10-minute call on one H100/H200; nothing is downloaded):
# the GPU tests, then `editstream bench gpu` on a random model of Llama-3-8B's shape in bf16:
# query latency unedited vs RECIPE with 100k and 1M edits stored and SCEN, edit and apply times per
# method, tokens/s for 32 chat requests. JSON and the test log go to bench/results/gpu/.
#
#   bench/gpu.sh                 # on the GPU machine
#   bench/gpu.sh --smoke         # a 64-dim model on the CPU: proves the script (in the test suite)
#   bench/gpu.sh --prepare DIR   # here: write the tokenizers to DIR, to carry where the embedded
#                                # model packages are not installed (then: bench/gpu.sh --assets DIR)
#
# Extra arguments go to `python -m services.cli.bench_gpu` (see its --help).
set -euo pipefail
cd "$(dirname "$0")/.."
py=python3
[[ -x .venv/bin/python ]] && py=.venv/bin/python
out=${GPU_BENCH_OUT:-bench/results/gpu}
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

case "${1:-}" in
--smoke)
    shift
    exec "$py" -m services.cli.bench_gpu --smoke --out "$out/gpu-smoke.json" "$@"
    ;;
--prepare)
    exec "$py" -m services.cli.bench_gpu --save-assets "${2:?--prepare needs a directory}"
    ;;
esac

assets=()
if [[ "${1:-}" == "--assets" ]]; then
    assets=(--assets "${2:?--assets needs a directory}")
    export EDITSTREAM_GPU_ASSETS="$2"
    shift 2
fi
"$py" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else "bench/gpu.sh: no CUDA device here (use --smoke on the CPU)")'
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu-device.txt" || true
tests=0
timeout 150 "$py" -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu.py 2>&1 | tee "$out/gpu-tests.log" || tests=$?
"$py" -m services.cli.bench_gpu "${assets[@]}" --out "$out/gpu.json" "$@"
exit "$tests"
