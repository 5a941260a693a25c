"""PPO, GRPO, Dr. GRPO, RLOO and REINFORCE++ on the built-in task, from one SFT policy and one reward model, each at
its preset (algo=...) with the same number of sampled responses per iteration (64: 64 prompts x 1, or 16 x 4), then
one `rlhf eval` of all of them: held-out proxy score, gold score and KL with standard errors, each one's
over-optimisation curve (gold and proxy against KL over its checkpoints) in one chart, and a table with the final
and peak gold, seconds per iteration and peak memory of each run.

    .venv/bin/python scripts/compare_estimators.py                      # the README's table (seed 0)
    .venv/bin/python scripts/compare_estimators.py --seed 1 --root runs/cmp1 --iterations 60

Each stage runs as `rlhf <stage>` in a fresh process (peak memory is that process's maximum resident set); a
finished stage is reused when the script runs again. Writes <root>/compare.json and <root>/compare.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ALGOS = ("ppo", "grpo", "dr_grpo", "rloo", "reinforce_pp")


def rlhf(*words: str) -> dict:
    """`rlhf <words>` in a fresh process; its exit code must be 0. Returns {"seconds", "max_rss_mb"}."""
    import time

    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "rlhf_cli", *words], stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        sys.exit(f"rlhf {' '.join(words)} exited with {code}")
    return {"seconds": time.perf_counter() - start, "max_rss_mb": usage.ru_maxrss / 1024}


def seconds_per_iteration(run_dir: Path) -> float:
    """From metrics.jsonl's timestamps: (last − first) / (iterations − 1), start-up and saving left out."""
    times = [json.loads(line)["time"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return (times[-1] - times[0]) / max(1, len(times) - 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default="runs/compare")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--iterations", type=int, default=60)
    args = parser.parse_args()
    root = Path(args.root).resolve()
    common = [f"root={root}", f"seed={args.seed}"]
    for stage in ("sft", "reward"):  # the shared upstream artifacts (reused when finished)
        if not (root / "base" / stage / "manifest.json").is_file():
            rlhf(stage, "experiment=base", *common)
    runs = {}
    for algo in ALGOS:
        run_dir = root / algo / "ppo"
        usage = rlhf("ppo", f"experiment={algo}", f"algo={algo}", f"train.max_steps={args.iterations}",
                     f"model.policy={root / 'base' / 'sft'}", f"model.reward={root / 'base' / 'reward'}",
                     "overwrite=true", *common)
        runs[algo] = {"run_dir": str(run_dir), "seconds_per_iteration": seconds_per_iteration(run_dir), **usage}
    policies = ",".join(str(root / a / "ppo") for a in ALGOS)
    rlhf("eval", "experiment=base", f"policies=[{root / 'base' / 'sft'},{policies}]", *common)
    report = json.loads((root / "base" / "eval" / "eval.json").read_text())
    rows = []
    for algo in ALGOS:
        path = str(root / algo / "ppo")
        final = next(p for p in report["policies"] if p["path"] == path)
        curve = report["curves"].get(path, [])
        peak = max(curve, key=lambda c: c["gold"]) if curve else final
        rows.append({"algo": algo, **{k: final[k] for k in ("score", "score_se", "gold", "gold_se", "kl", "kl_se")},
                     "peak_gold": peak["gold"], "peak_gold_se": peak["gold_se"], "peak_step": peak.get("step"),
                     "peak_kl": peak["kl"], **runs[algo]})
    sft = next(p for p in report["policies"] if p["path"] == str(root / "base" / "sft"))
    (root / "compare.json").write_text(json.dumps({"seed": args.seed, "iterations": args.iterations, "sft": sft,
                                                   "rows": rows}, indent=2))
    lines = ["| preset | proxy score | gold (final) | gold (peak, iteration) | KL to SFT | s / iteration | peak memory |",
             "|---|---:|---:|---:|---:|---:|---:|",
             f"| SFT | {sft['score']:.2f} ± {sft['score_se']:.2f} | {sft['gold']:.2f} ± {sft['gold_se']:.2f} | | 0 | | |"]
    for r in rows:
        lines.append(f"| {r['algo']} | {r['score']:.2f} ± {r['score_se']:.2f} | {r['gold']:.2f} ± {r['gold_se']:.2f} | "
                     f"{r['peak_gold']:.2f} ± {r['peak_gold_se']:.2f} ({r['peak_step']}) | {r['kl']:.2f} ± "
                     f"{r['kl_se']:.2f} | {r['seconds_per_iteration']:.2f} | {r['max_rss_mb']:.0f} MB |")
    (root / "compare.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"\nover-optimisation curves: {root / 'base' / 'eval' / 'charts' / 'overoptimisation.png'}")


if __name__ == "__main__":
    main()
