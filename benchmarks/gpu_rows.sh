#!/usr/bin/env bash
# Every GPU row of benchmarks/, as one prepared run sized for a lent GPU's ~15 minutes of device time (one
# `run` call of at most 10 minutes). Rows go in order of what is least known: the low-memory goals first (issue
# 14: 512 <= 8 GB, 1024 <= 12 GB with --low-vram), then end to end, then the per-part rows. Each row has its own
# time limit, so one slow row cannot eat the others; everything a row prints lands in $OUT/<row>.txt.
#
# On the device machine (its python3 has torch, not dc_app's other needs; see benchmarks/README.md):
#   bash tools/gpu_wheels.sh                   # here, once: downloads the missing wheels into .whl/ (ignored)
#   run(command="bash benchmarks/gpu_rows.sh", carry=[".whl"], timeout_s=600)
set -u
OUT="${OUT:-benchmarks/gpu-results}"
mkdir -p "$OUT"
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/device.txt" 2>&1
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" >> "$OUT/device.txt" 2>&1

row() {  # row NAME SECONDS COMMAND...: one benchmark row, its output to $OUT/NAME.txt
    local name=$1 limit=$2
    shift 2
    echo "== $name ($limit s): $*"
    timeout "$limit" "$@" > "$OUT/$name.txt" 2>&1
    echo "   exit $? after $SECONDS s in all"
}

row low_memory      150 python3 benchmarks/low_memory.py --gpu --models 512,1024 --steps 5
row end_to_end      150 python3 benchmarks/gpu_end_to_end.py --steps 10 --repeats 1 --baseline
row unet_forward     70 python3 benchmarks/unet_forward.py --repeats 3
row cfg_batching     60 python3 benchmarks/cfg_batching.py --models tiny,512 --repeats 3
row memory_precision 60 python3 benchmarks/memory_precision.py --models tiny,reduced,512
row samplers_long    60 sh -c "python3 benchmarks/sampler_quality.py --no-quality --time 512 --repeats 2; \
python3 benchmarks/long_video.py --model 512 --multiples 1,2,4 --repeats 2 --device cuda"
