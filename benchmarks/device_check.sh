#!/usr/bin/env bash
# One prepared run on a lent GPU machine (the `device` tool), from the root of the checkout:
# the test suite with CUDA available (the CUDA tests included), then the CUDA tables.
#
# The device image has torch, torchvision, pytest, hypothesis, scikit-learn and matplotlib; zennit
# and Captum travel as wheels in .whl (ignored by git), prepared here once:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --implementation cp -d .whl zennit==0.5.1 captum==0.9.0
# then: device run with carry [".whl"] and command `bash benchmarks/device_check.sh`
# (about 5 minutes; timeout_s 540 leaves room for the start).
#
# Writes to $OUT (or ./out): gpu.txt, tests.log, rules/rules.{json,md}, models/models.{json,md}.
set -uo pipefail
out="${OUT:-out}"
mkdir -p "$out"
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$out/gpu.txt" 2>&1
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())" >> "$out/gpu.txt" 2>&1
cat "$out/gpu.txt"
timeout 240 python3 -m pytest -q -p no:cacheprovider --doctest-modules lrpkit tests > "$out/tests.log" 2>&1
echo "tests: exit $?"; tail -5 "$out/tests.log"
timeout 60 python3 -m benchmarks rules --device cuda --out "$out/rules" > /dev/null 2>&1; echo "rules: exit $?"
timeout 180 python3 -m benchmarks models --device cuda --models vgg16 resnet50 vit_b_16 --batch 1 8 32 \
    --repeats 10 --warmup 3 --out "$out/models" > /dev/null 2>&1; echo "models: exit $?"
