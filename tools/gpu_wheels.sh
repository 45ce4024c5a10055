#!/usr/bin/env bash
# The wheels dc_app's benchmarks need on the lent GPU machine beyond what its python3 has (torch, numpy, pillow,
# safetensors, huggingface_hub, timm, regex are there): omegaconf and open_clip_torch with their own needs.
# Downloads them into .whl/ (git-ignored through .git/info/exclude), for benchmarks/gpu_rows.sh; its python3 is
# CPython 3.12 on x86-64 Linux.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
mkdir -p .whl
# The versions the tests run with here (pip show).
for spec in omegaconf==2.4.0 open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.7.0; do
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform any --platform manylinux2014_x86_64 -d .whl "$spec"
done
ls .whl
