#!/bin/bash
# The one script a lent GPU machine runs (CI has no GPU). Stages, one or more as arguments:
#   kernels      install carried wheels, print the device, run every kernel test against its numpy twin (directly
#                and through rocmforge.ops.dispatch)
#   model        join the model parts, run the full-model tests (GPU vs numpy logits, greedy tokens, generate through
#                the decode graph vs eager), the GPU hook test, notebook 05's code cells and the benchmark
#   ncu          time each kernel of one decode step with Nsight Compute (after model, on the same machine)
#   prefill      pp512 with the matrix-unit matmuls beside the float32 tiles, and the prefill's device time per kernel,
#                for every model already joined on the machine (benchmarks/gpu_prefill.py)
#   stash        nothing but keeping the carried model parts (Gemma's 253 MB travel in five parts)
#   gemma        join Gemma's parts, run its full-model tests and the benchmark
# SmolLM2 (98 MB) is bigger than what one call may carry (64 MiB), so it travels in two halves
# (.device/model_a/part.a, .device/model_b/part.b) on two back-to-back calls; every stage keeps the parts it
# was given on the machine, which stays warm for ~30 s between calls.
# Logs go to $OUT (the device tool brings them back).
set -o pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if [ -d .device/wheels ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .device/wheels/*.whl || exit 1
fi
export PYTHONPATH=/tmp/site:$PWD
export ROCMFORGE_HOME=/root/rfhome
model_dir=$ROCMFORGE_HOME/models/smollm2-135m
mkdir -p "$model_dir"
cp .device/model_*/part.* "$model_dir/" 2>/dev/null && ls -la "$model_dir"
gemma_dir=$ROCMFORGE_HOME/models/gemma3-270m
mkdir -p "$gemma_dir"
cp .device/gemma_*/gpart.* "$gemma_dir/" 2>/dev/null && ls -la "$gemma_dir"

for stage in "${@:-kernels}"; do
case $stage in
kernels)
  nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used --format=csv | tee "$OUT/device.txt"
  python3 -V | tee -a "$OUT/device.txt"
  python3 -c "import cuda.bindings, numpy, gguf; print('cuda-bindings', cuda.bindings.__version__, 'numpy', numpy.__version__)" | tee -a "$OUT/device.txt"
  python3 -m pytest -o addopts="" tests/test_gpu_kernels.py tests/test_device_select.py tests/test_ops_dispatch.py \
    -q -p no:cacheprovider -rs 2>&1 | tee "$OUT/kernels.log" | tail -40
  ;;
model)
  if ls "$model_dir"/part.* >/dev/null 2>&1; then  # parts carried this time (else: joined by an earlier call)
    cat "$model_dir"/part.* > "$model_dir/SmolLM2-135M-Instruct.Q4_1.gguf" && rm "$model_dir"/part.*
  fi
  sha256sum "$model_dir/SmolLM2-135M-Instruct.Q4_1.gguf" | tee "$OUT/model.sha256"
  python3 -m pytest -o addopts="" tests/test_gpu_model.py -q -p no:cacheprovider -rs -s 2>&1 | tee "$OUT/model.log" | tail -15
  python3 -m pytest -o addopts="" tests/test_gpu_hooks.py -q -p no:cacheprovider -rs 2>&1 | tee "$OUT/hooks.log" | tail -5
  # notebook 05's code cells as one script (nbval and jupyter are not on the device machine)
  python3 -c "import json; print('\n'.join(''.join(c['source']) for c in json.load(open('notebooks/05_kernels.ipynb'))['cells'] if c['cell_type'] == 'code'))" \
    > /tmp/nb05.py && MPLBACKEND=Agg python3 /tmp/nb05.py 2>&1 | tee "$OUT/notebook05.log" | tail -25
  python3 benchmarks/gpu_decode.py smollm2-135m --json "$OUT/bench.json" 2>&1 | tee "$OUT/bench.log"
  python3 benchmarks/gpu_decode.py smollm2-135m --no-rounding --json "$OUT/bench_float32.json" 2>&1 | tee "$OUT/bench_float32.log"
  ;;
prefill)
  python3 benchmarks/gpu_prefill.py $(ls "$model_dir"/*.gguf "$gemma_dir"/*.gguf 2>/dev/null) --json "$OUT/prefill.json" \
    2>&1 | tee "$OUT/prefill.log"
  ;;
stash)
  ;;
gemma)
  if ls "$gemma_dir"/gpart.* >/dev/null 2>&1; then
    cat "$gemma_dir"/gpart.* > "$gemma_dir/gemma-3-270m-q4_k_m.gguf" && rm "$gemma_dir"/gpart.*
  fi
  sha256sum "$gemma_dir/gemma-3-270m-q4_k_m.gguf" | tee "$OUT/gemma.sha256"
  python3 -m pytest -o addopts="" tests/test_gpu_model.py -k gemma -q -p no:cacheprovider -rs -s 2>&1 | tee "$OUT/gemma.log" | tail -30
  python3 benchmarks/gpu_decode.py gemma3-270m --json "$OUT/bench_gemma.json" 2>&1 | tee "$OUT/bench_gemma.log"
  ;;
ncu)
  ncu --metrics gpu__time_duration.sum --csv -k 'regex:matvec|attn_decode|embed' -c 200 \
    python3 benchmarks/gpu_kernel_times.py > "$OUT/ncu_decode.csv" 2> "$OUT/ncu.err"
  python3 - "$OUT/ncu_decode.csv" <<'PY'
import csv, sys
from collections import defaultdict
rows = [r for r in csv.reader(open(sys.argv[1])) if len(r) > 10]
head, rows = rows[0], rows[1:]
name, value = head.index("Kernel Name"), head.index("Metric Value")
totals = defaultdict(list)
for r in rows[-152:]:  # the decode step's kernels are the last ones
    totals[r[name].split("(")[0]].append(float(r[value].replace(",", "")) / 1e3)
for k, v in sorted(totals.items(), key=lambda kv: -sum(kv[1])):
    print(f"{k:28s} {len(v):4d} x  mean {sum(v) / len(v):7.2f} us  total {sum(v):8.1f} us")
PY
  ;;
esac
done
