#!/usr/bin/env bash
# Issue 10's GPU workloads in one go, each under its own time limit, every figure written as JSON to $OUT
# (default ./gpu-checks): SFT tokens/s and MFU of a 465M Llama (32 x 512, bf16; eager and train.compile), PPO
# seconds per iteration and generation tokens/s (64 prompts x (128 + 128); eager and compiled rollouts), the
# first-minibatch approx-KL of a short default PPO run on CUDA, issue 11's one-GPU check (the SFT step of the
# 465M Llama under train.strategy=fsdp on one rank against ddp: FSDP must not be more than 10% slower), and
# nvidia-smi's view of the card.
#
#   bash scripts/gpu_checks.sh                # on the GPU machine (after `source .whl/gpu-env.sh` there)
#   SMALL=1 bash scripts/gpu_checks.sh        # the same steps with tiny sizes: a dry run on a CPU
#
# A step that fails or runs out of time is recorded (its log kept) and the next one runs.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-checks}
mkdir -p "$OUT"
PY=${PYTHON:-python}
export RLHF_CLI_CACHE=${RLHF_CLI_CACHE:-$OUT/cache}

if [ "${SMALL:-0}" = 1 ]; then
    MODEL=(--hidden-size 32 --layers 1 --heads 2 --vocab-size 1000)
    SFT=(--batch 4 --seq-len 32 --min-len 32 --prompt-fraction 0 --steps 2 --warmup 1)
    PPO=(--intermediate-size 64 --prompts 4 --prompt-length 8 --response-length 8 --micro-batch 2 --mini-batches 2
         --iterations 1)
    PIPE=(sft.train.max_steps=10 reward.train.max_steps=10 ppo.train.max_steps=2)
    LIMIT=300
else
    MODEL=(--hidden-size 1024 --layers 24 --heads 16 --vocab-size 30522)
    SFT=(--batch 32 --micro-batch 32 --seq-len 512 --min-len 512 --prompt-fraction 0 --steps 20 --warmup 3)
    PPO=(--intermediate-size 4096 --prompts 64 --prompt-length 128 --response-length 128 --micro-batch 16
         --mini-batches 2 --iterations 3)
    PIPE=(ppo.train.max_steps=10)
    LIMIT=150
fi

step() {  # name, time limit (s), command...: stdout's last line to $OUT/name.json, everything to $OUT/name.log
    local name=$1 limit=$2
    shift 2
    local t0=$SECONDS
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    tail -n 1 "$OUT/$name.log" > "$OUT/$name.json"
    echo "$name: rc=$rc, $((SECONDS - t0)) s" | tee -a "$OUT/summary.txt"
}

nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || echo "no nvidia-smi" > "$OUT/nvidia-smi.txt"
step sft_eager "$LIMIT" "$PY" scripts/bench_sft.py "${MODEL[@]}" "${SFT[@]}" --json
step sft_compile "$((LIMIT + 60))" "$PY" scripts/bench_sft.py "${MODEL[@]}" "${SFT[@]}" --compile --json
step ppo_eager "$LIMIT" "$PY" scripts/bench_ppo.py "${MODEL[@]}" "${PPO[@]}" --rollout-backend eager --json
step ppo_compiled "$((LIMIT + 60))" "$PY" scripts/bench_ppo.py "${MODEL[@]}" "${PPO[@]}" --rollout-backend compiled \
    --json
step sft_fsdp1 "$LIMIT" "$PY" scripts/bench_sft.py "${MODEL[@]}" "${SFT[@]}" --strategy fsdp --json
rm -rf "$OUT/pipeline"
step pipeline "$LIMIT" "$PY" -m rlhf_cli pipeline root="$OUT/pipeline" "${PIPE[@]}"
"$PY" - "$OUT" <<'EOF' >> "$OUT/summary.txt" 2>&1
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
for name in ("sft_eager", "sft_compile", "sft_fsdp1", "ppo_eager", "ppo_compiled"):
    try:
        d = json.loads((out / f"{name}.json").read_text())
    except ValueError:
        print(f"{name}: no figures (see {name}.log)")
        continue
    keys = ("device", "tokens_per_s", "mfu", "s_per_step", "peak_memory_mib", "seconds_per_iteration",
            "generation_tokens_per_s", "rollout_tokens_per_s", "update_tokens_per_s", "update_mfu")
    print(name, {k: d[k] for k in keys if k in d})
try:
    ddp, fsdp = (json.loads((out / f"{n}.json").read_text())["s_per_step"] for n in ("sft_eager", "sft_fsdp1"))
    print(f"fsdp on one rank / ddp, seconds per step: {fsdp / ddp:.3f} (issue 11: at most 1.10)")
except (ValueError, KeyError):
    pass
metrics = out / "pipeline" / "default" / "ppo" / "metrics.jsonl"
if metrics.is_file():
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    print("ppo first_minibatch_approx_kl per iteration:", [r["first_minibatch_approx_kl"] for r in rows])
EOF
cat "$OUT/summary.txt"
