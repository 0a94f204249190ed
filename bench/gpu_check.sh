#!/usr/bin/env bash
# The prepared GPU check: one command for a lent GPU machine (about 7 minutes on one H100/H200, fresh clone).
#
#   bench/gpu_check.sh            on a CUDA machine: environment, GPU correctness tests, timings, training steps
#   bench/gpu_check.sh --quick    the same in under 4 minutes: fewer shapes, 10 training steps
#   bench/gpu_check.sh --learning the learning section alone (under 5 minutes): bench/gpu_learning.py, ViT-S/16
#                                 on procedural images, working objective vs shuffled targets vs KoLeo off
#   bench/gpu_check.sh --fp32-probe  every fp32 attention tile alone (bench/fp32_attention_probe.py, <= 5 minutes):
#                                 which one faults (issue 29), with compute-sanitizer's report when the image has it
#   bench/gpu_check.sh --official the training step against the official DINOv3 code's (bench/official_step.py,
#                                 ~4 minutes), vitl16-im1k recipe; needs third_party/dinov3 and third_party/wheels
#                                 carried (git-ignored: see the script's docstring)
#   bench/gpu_check.sh --dry-run  anywhere: print the plan and run what a CPU can (CI runs this)
#
# Results go to $OUT when set (the device tool collects that folder), else gpu_results/:
#   env.txt          GPU, driver, Python, torch, Triton, what was installed
#   precompile.txt   the attention kernels compiled for this GPU in parallel processes (warms Triton's cache, so
#                    the tests and timings do not compile ~250 variants one after another inside autotuning)
#   gpu_tests.txt    TRITON_INTERPRET=0 pytest -m gpu tests/test_gpu.py (bf16/fp16/fp32 vs float64, fwd + bwd)
#   timings.json/md  bench/gpu_timings.py: attention, Sinkhorn, Gram, 30-step vit_large training, distillation
#                    into a ResNet-50 from a ViT-L teacher, the data loader alone, curate.py's embed and Lloyd
#                    steps (these three not in --quick)
#   timings.log      its output, with Triton's autotuning choices (TRITON_PRINT_AUTOTUNING=1)
#   learning.json/md --learning: each run's k-NN curve, DINO term against ln K, health panel, images/s
#   fp32_probe.json/md  --fp32-probe: each config's status (ok / wrong / fault) and errors against float64
#   official_step.json  --official: images/s, peak memory and MFU of both steps, same card, same batch
#   summary.txt      each step's exit status and seconds
# Missing Python packages are installed from the requirements files: from wheels in $WHEELS (default .whl/)
# when that folder exists (a machine with no network), else from the package index. torch and Triton are never
# reinstalled: the machine's own CUDA build is what gets measured.
set -uo pipefail
cd "$(dirname "$0")/.."

DRY_RUN=0
QUICK=0
LEARNING=0
FP32_PROBE=0
OFFICIAL=0
[[ "${1:-}" == "--dry-run" ]] && DRY_RUN=1
[[ "${1:-}" == "--quick" ]] && QUICK=1
[[ "${1:-}" == "--learning" ]] && LEARNING=1
[[ "${1:-}" == "--fp32-probe" ]] && FP32_PROBE=1
[[ "${1:-}" == "--official" ]] && OFFICIAL=1
OUT_DIR="${OUT:-gpu_results}"
mkdir -p "$OUT_DIR"
PY="${PYTHON:-python3}"
[[ -z "${PYTHON:-}" && -x .venv/bin/python && $DRY_RUN == 1 ]] && PY=.venv/bin/python
SUMMARY="$OUT_DIR/summary.txt"
: > "$SUMMARY"

step() {  # step NAME TIMEOUT_S COMMAND...: run with a time limit, record status and duration, never abort
    local name=$1 limit=$2
    shift 2
    local start=$SECONDS
    echo "== $name (limit ${limit}s): $*"
    timeout --signal=INT --kill-after=15 "$limit" "$@"
    local status=$?
    echo "$name: exit $status, $((SECONDS - start)) s" | tee -a "$SUMMARY"
}

if [[ $DRY_RUN == 1 ]]; then
    cat <<EOF
gpu_check --dry-run: the plan on a CUDA machine
  1. env.txt: nvidia-smi, Python, torch, Triton versions; install missing requirements (never torch/Triton)
  2. python bench/compile_sweep.py --arch <this GPU> --kernels attention --quiet  (limit 60 s)
  3. TRITON_INTERPRET=0 pytest -m gpu tests/test_gpu.py  (limit 120 s)
  4. TRITON_PRINT_AUTOTUNING=1 python bench/gpu_timings.py --out \$OUT  (limit 300 s; the training steps are its
     section 'train')
  --learning instead: python bench/gpu_learning.py --out \$OUT  (limit 300 s: three runs of 70 s)
  --fp32-probe instead: python bench/fp32_attention_probe.py --sanitizer --out \$OUT  (limit 300 s)
  --official instead: torchrun --nproc_per_node=1 bench/official_step.py --batch 32 --out \$OUT  (limit 420 s)
Now, on this machine: the kernels' interpreter correctness subset, the timing script at tiny CPU sizes, and the
GPU tests' collection (they skip without CUDA).
EOF
    export TRITON_INTERPRET=1
    step interpreter-subset 600 "$PY" -m pytest -q -p no:cacheprovider \
        "tests/test_rope_attention.py::test_forward_and_grads_match_float64_reference[1-2-7-9-5-64-dtype7-True-inline]" \
        "tests/test_rope_attention.py::test_forward_and_grads_match_float64_reference[1-2-7-9-5-64-dtype7-True-prerotate]" \
        "tests/test_sinkhorn.py::test_matches_official_algorithm[triton-37x300-bfloat16]" \
        2>&1 | tee "$OUT_DIR/interpreter_tests.txt"
    unset TRITON_INTERPRET
    step gpu-tests-collect 300 "$PY" -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py \
        2>&1 | tee "$OUT_DIR/gpu_tests.txt"
    step timings-dry-run 600 "$PY" bench/gpu_timings.py --dry-run --out "$OUT_DIR" 2>&1 | tee "$OUT_DIR/timings.log"
    step learning-dry-run 600 "$PY" bench/gpu_learning.py --dry-run --out "$OUT_DIR" 2>&1 \
        | tee "$OUT_DIR/learning.log"
    cat "$SUMMARY"
    ! grep -qv ": exit 0," "$SUMMARY"
    exit $?
fi

{
    date -u
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv || true
    "$PY" -c "import sys, torch, triton; print('python', sys.version.split()[0]); print('torch', torch.__version__, 'cuda', torch.version.cuda); print('triton', triton.__version__); print('gpu', torch.cuda.get_device_name(), torch.cuda.get_device_capability())"
} > "$OUT_DIR/env.txt" 2>&1
cat "$OUT_DIR/env.txt"

# Packages the code imports, by module name -> requirement name; torch/Triton excluded on purpose.
missing=$("$PY" - <<'EOF'
import importlib.util
needed = {"numpy": "numpy", "tyro": "tyro", "tensorboard": "tensorboard", "PIL": "pillow", "pytest": "pytest",
          "pytest_benchmark": "pytest-benchmark", "skimage": "scikit-image", "sklearn": "scikit-learn"}
print(" ".join(req for mod, req in needed.items() if importlib.util.find_spec(mod) is None))
EOF
)
if [[ -n "$missing" ]]; then
    WHEELS="${WHEELS:-.whl}"
    if [[ -d "$WHEELS" ]]; then
        echo "installing from $WHEELS: $missing"
        "$PY" -m pip install -q --no-index --no-deps --target /tmp/gpu_check_site "$WHEELS"/*.whl \
            && export PYTHONPATH="/tmp/gpu_check_site${PYTHONPATH:+:$PYTHONPATH}"
    else
        echo "installing from the package index: $missing"
        "$PY" -m pip install -q $missing
    fi
    echo "installed: $missing" >> "$OUT_DIR/env.txt"
fi

export TRITON_INTERPRET=0 PYTHONUNBUFFERED=1
if [[ $FP32_PROBE == 1 ]]; then
    step fp32-probe 300 "$PY" bench/fp32_attention_probe.py --sanitizer --timeout 100 --out "$OUT_DIR" 2>&1 \
        | tee "$OUT_DIR/fp32_probe.log"
    cat "$SUMMARY"
    ! grep -qv ": exit 0," "$SUMMARY"
    exit $?
fi
if [[ $OFFICIAL == 1 ]]; then
    # The official code's pure-Python requirements, from the carried wheels (the device has no network).
    "$PY" -m pip install -q --no-index --no-deps --find-links third_party/wheels --target /tmp/official_site \
        omegaconf antlr4-python3-runtime pyyaml ftfy wcwidth regex submitit cloudpickle termcolor torchmetrics \
        lightning-utilities packaging 2>&1 | tail -3
    step official 420 "$PY" -m torch.distributed.run --nproc_per_node=1 bench/official_step.py \
        --site /tmp/official_site --batch 32 --out "$OUT_DIR" 2>&1 | tee "$OUT_DIR/official_step.log"
    cat "$SUMMARY"
    ! grep -qv ": exit 0," "$SUMMARY"
    exit $?
fi
if [[ $LEARNING == 1 ]]; then
    step learning 300 "$PY" bench/gpu_learning.py --seconds 70 --out "$OUT_DIR" 2>&1 | tee "$OUT_DIR/learning.log"
    cat "$SUMMARY"
    ! grep -qv ": exit 0," "$SUMMARY"
    exit $?
fi
ARCH=$("$PY" -c "import torch; major, minor = torch.cuda.get_device_capability(); print(10 * major + minor)")
if [[ $QUICK == 1 ]]; then
    LIMITS=(40 60 130)
    TEST_FILTER=(-k "not hires_512px and not 4096")
    TIMING_ARGS=(--quick --sections attention,train,sinkhorn,gram)
else
    LIMITS=(60 120 300)
    TEST_FILTER=()
    TIMING_ARGS=()
fi
step precompile "${LIMITS[0]}" "$PY" bench/compile_sweep.py --arch "$ARCH" --kernels attention --quiet 2>&1 \
    | tee "$OUT_DIR/precompile.txt"
step gpu-tests "${LIMITS[1]}" "$PY" -m pytest -q -p no:cacheprovider -m gpu -rfE "${TEST_FILTER[@]}" tests/test_gpu.py \
    2>&1 | tee "$OUT_DIR/gpu_tests.txt"
TRITON_PRINT_AUTOTUNING=1 step timings "${LIMITS[2]}" "$PY" bench/gpu_timings.py --out "$OUT_DIR" "${TIMING_ARGS[@]}" \
    2>&1 | tee "$OUT_DIR/timings.log"
cat "$SUMMARY"
