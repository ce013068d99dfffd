#!/usr/bin/env bash
# One-shot GPU check, run from the repository root:  deploy/gpu_check.sh OUT_DIR
#
# 1. The in-process engine in bf16 on the GPU (`bench offline`: HF greedy and assisted generation,
#    the draft-LM, DSpark and n-gram engines at batch 1; each row's output compared with HF greedy
#    token for token). Needs torch with CUDA, transformers, pydantic, tqdm, pyyaml; no Ray.
# 2. Where Ray is installed: the distributed backend (worker actors, nccl, bf16) served through the
#    ModelServer coordinator at c=1 and c=16, pipelined and not, with the draft LM and with DSpark
#    (`python -m dspark_ray.serving.distributed.gpu_check`).
#
# Figures and logs land in OUT_DIR. DEVICE=cpu DTYPE=float32 runs the same steps on a CPU (a smoke
# test of this script; DTYPE=bfloat16 smoke-tests the bf16 paths); NUM_PROMPTS and MAX_TOKENS size the runs.
set -uo pipefail
out=${1:?usage: deploy/gpu_check.sh OUT_DIR}
device=${DEVICE:-cuda}
dtype=${DTYPE:-bfloat16}
num_prompts=${NUM_PROMPTS:-16}
max_tokens=${MAX_TOKENS:-128}
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
status=0

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi"
  python3 -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(),
'transformers', transformers.__version__)"; } 2>&1 | tee "$out/environment.txt"

python3 -m dspark_ray.bench.offline --device "$device" --dtype "$dtype" --num-prompts "$num_prompts" \
  --max-tokens "$max_tokens" --repetitions 3 --out "$out/offline.json" 2>&1 | tee "$out/offline.log" || status=1

if python3 -c "import ray" 2>/dev/null; then
  cpu_flag=$([ "$device" = cpu ] && echo --cpu)
  for drafter in model dspark; do
    python3 -m dspark_ray.serving.distributed.gpu_check $cpu_flag --dtype "$dtype" --drafter "$drafter" --concurrency 1,16 \
      --num-prompts "$((2 * num_prompts))" --max-tokens "$max_tokens" --json "$out/distributed_$drafter.json" \
      2>&1 | tee "$out/distributed_$drafter.log" || status=1
  done
else
  echo "Ray is not installed: the distributed check (nccl, served) was skipped" | tee -a "$out/environment.txt"
fi
exit $status
