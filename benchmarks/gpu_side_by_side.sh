#!/bin/bash
# rocmforge next to llama.cpp on a lent NVIDIA GPU, on the shape twins of SmolLM2-135M and Gemma-3-270M (real shapes
# and types, random weights: benchmarks/shape_twin.py). Run from the repository root on the device machine:
#   bash benchmarks/gpu_side_by_side.sh [stage ...]        (default: build tests rocmforge single llama compare)
# Stages:
#   build      start building llama.cpp (llama-bench, llama-batched-bench, llama-server) in the background from
#              $RF_DEVICE/llamacpp.tar.xz (the source vendored in llama-cpp-python 0.3.36's sdist, trimmed); ~5 min
#              with $LLAMA_JOBS (10) jobs, so the other stages run meanwhile. Stages that need it wait for it.
#   tests      the batched-decode GPU tests (tests/test_gpu_batched.py) on a tiny model and both twins
#   rocmforge  benchmarks/gpu_batched.py on both twins (B = 1, 8, 32, 64; 128-token prompts, 128 new tokens each)
#   single     benchmarks/gpu_decode.py on both twins (one sequence through graph_step: pp512, tg128)
#   llama      llama-batched-bench (-npp 128 -ntg 128 -npl 1,8,32,64 -fa on) and llama-bench (pp512, tg128, -fa 1)
#              on the same twins
#   compare    the side-by-side table (benchmarks/gpu_batched.py compare)
# More stages (the server comparison) go in the case below. Inputs, from $RF_DEVICE (default .device): twins/*.header,
# llamacpp.tar.xz, wheels/*.whl (gguf 0.19: the device has no network). Output: $OUT/side_by_side.log, compare.md, rocmforge_*.json.
set -o pipefail
OUT=${OUT:-/tmp/out}
RF_DEVICE=${RF_DEVICE:-.device}
mkdir -p "$OUT" /tmp/sbs
LOG=$OUT/side_by_side.log  # everything printed; only this, compare.md and rocmforge_*.json come back (few files)
export PYTHONUNBUFFERED=1 ROCMFORGE_HOME=/tmp/rfhome ROCMFORGE_TWIN_DIR=/tmp/twins
if ! python3 -c "import gguf" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site "$RF_DEVICE"/wheels/*.whl || exit 1
fi
export PYTHONPATH=/tmp/site:$PWD
mkdir -p /tmp/twins
for name in smollm2 gemma3; do
  [ -f /tmp/twins/$name.gguf ] || python3 benchmarks/shape_twin.py expand "$RF_DEVICE/twins/$name.header" /tmp/twins/$name.gguf --seed 0 >/dev/null || exit 1
done
LLAMA=/tmp/llama-build/bin

wait_for_build() {
  while [ ! -f /tmp/llama-build.done ]; do sleep 5; done
  grep -B5 -m3 -i "error" /tmp/sbs/llama_build.log | tee -a "$LOG"; tail -2 /tmp/sbs/llama_build.log | tee -a "$LOG"
}

for stage in "${@:-build tests rocmforge single llama compare}"; do
for stage in $stage; do
case $stage in
build)
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee -a "$LOG"
  rm -f /tmp/llama-build.done
  (mkdir -p /tmp/llama-src && tar xJf "$RF_DEVICE/llamacpp.tar.xz" -C /tmp/llama-src \
    && cmake -S /tmp/llama-src/llama.cpp -B /tmp/llama-build -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 -DLLAMA_CURL=OFF \
       -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_BUILD_UI=OFF \
       -DLLAMA_BUILD_APP=OFF -DCMAKE_BUILD_TYPE=Release \
    && cmake --build /tmp/llama-build --target llama-bench llama-batched-bench llama-server -j ${LLAMA_JOBS:-10}; \
    echo "build exit $?"; touch /tmp/llama-build.done) > /tmp/sbs/llama_build.log 2>&1 &
  ;;
tests)
  python3 -m pytest -o addopts="" tests/test_gpu_batched.py -q -p no:cacheprovider -rs -s 2>&1 | tee -a "$LOG" | tail -25
  ;;
rocmforge)
  for name in smollm2 gemma3; do
    python3 benchmarks/gpu_batched.py run /tmp/twins/$name.gguf --json "$OUT/rocmforge_$name.json" 2>&1 | tee -a "$LOG"
  done
  ;;
single)
  for name in smollm2 gemma3; do
    python3 benchmarks/gpu_decode.py /tmp/twins/$name.gguf 2>&1 | head -4 | tee -a "$LOG"
  done
  ;;
llama)
  wait_for_build
  for name in smollm2 gemma3; do
    $LLAMA/llama-batched-bench -m /tmp/twins/$name.gguf -c 17000 -b 2048 -ub 512 -npp 128 -ntg 128 -npl 1,8,32,64 \
      -fa on -ngl 99 2>/tmp/sbs/llama_batched_$name.err | tee /tmp/sbs/llama_batched_$name.log | tee -a "$LOG"
    $LLAMA/llama-bench -m /tmp/twins/$name.gguf -p 512 -n 128 -fa 1 -ngl 99 2>/tmp/sbs/llama_bench_$name.err \
      | tee /tmp/sbs/llama_bench_$name.log | tee -a "$LOG"
  done
  ;;
compare)
  python3 benchmarks/gpu_batched.py compare "$OUT"/rocmforge_smollm2.json "$OUT"/rocmforge_gemma3.json \
    --batched /tmp/sbs/llama_batched_smollm2.log /tmp/sbs/llama_batched_gemma3.log \
    --bench /tmp/sbs/llama_bench_smollm2.log /tmp/sbs/llama_bench_gemma3.log | tee "$OUT/compare.md"
  ;;
*)
  echo "unknown stage $stage" >&2; exit 2
  ;;
esac
done
done
