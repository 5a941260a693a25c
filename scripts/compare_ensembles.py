"""A single reward model against a `reward.ensemble=4` optimised with `mean`, `min` and `uwo`, on the built-in task
with its default label noise, from one SFT policy per seed, at the default PPO run length and one three times
longer; then one `rlhf eval` per seed of every run (gold score, proxy score, KL and the ensemble's disagreement,
each run's over-optimisation curve over its checkpoints, all on one chart), and a table over seeds.

    .venv/bin/python scripts/compare_ensembles.py                          # the README's table (seeds 0 1 2)
    .venv/bin/python scripts/compare_ensembles.py --seeds 0 --iterations 60 --root runs/ens-quick
    .venv/bin/python scripts/compare_ensembles.py --cost                   # reward-stage and PPO cost, full and LoRA

Per seed s, under <root>/seed<s>/: `base` (sft; reward, the single reward model), `ens` (reward with
reward.ensemble=4, members on seeds s..s+3, each on its own bootstrap resample of the training pairs), then PPO
runs `<kind>-<iterations>` from base/sft: `single` (the single reward model, its raw score: the default),
`single_std` (the same, standardised with its held-out statistics, ppo.normalize_scores=true: the scale every
ensemble member is put on), and `mean`, `min`, `uwo` (the ensemble, ppo.reward_aggregation; uwo at
ppo.uwo_coef=0.5). Each PPO run keeps a checkpoint every 10 iterations (all of them), which `rlhf eval` measures
on 256 held-out prompts with the ensemble as its reward model (its mean: the same proxy for every run). The runs
start as `rlhf <stage>` in a fresh process, one after another; a finished stage is reused when the script runs
again.

Per run: the final gold score, its peak over the checkpoints (and the iteration), final − peak and what a curve
that did not move at all would show there (the peak of noisy points is biased upwards), the final KL, the
ensemble's disagreement on the final policy's responses, and the final gold's gain over `single`'s: each a mean
over seeds with the standard error across seeds (the per-seed eval's own standard errors are in eval.json).
Seconds per iteration go to compare.json only: use `--cost`, run alone, for timings. Writes <root>/compare.json, <root>/compare.md and
<root>/ensembles.png (gold against KL, the seeds' mean at each checkpoint, one panel per run length).

`--cost`: seconds of the reward stage with reward.ensemble=1 and 4, full fine-tuning and LoRA members
(model.lora.r=8), and PPO seconds per iteration and peak memory with one reward model, 4 full members and 4 LoRA
members scored over one base, for a full and a LoRA (r=8) policy (20 iterations each), into <root>/cost.md. Run
nothing else meanwhile: two torch processes on 2 cores slow each other.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

KINDS = {  # name -> the ppo overrides of that run (model.reward is added per seed)
    "single": [],
    "single_std": ["ppo.normalize_scores=true"],
    "mean": ["ppo.reward_aggregation=mean"],
    "min": ["ppo.reward_aggregation=min"],
    "uwo": ["ppo.reward_aggregation=uwo", "ppo.uwo_coef=0.5"],
}
ENSEMBLE = 4


def rlhf(*words: str, cwd: Path | None = None) -> dict:
    """`rlhf <words>` in a fresh process (its output to <cwd>/logs/); its exit code must be 0. Returns
    {"seconds", "max_rss_mb"}."""
    start = time.perf_counter()
    logs = (cwd or Path.cwd()) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    name = "_".join(w.split("=")[-1].replace("/", "-") for w in words[:2])[:80]
    with open(logs / f"{name}.log", "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "rlhf_cli", *words], stdout=out, stderr=subprocess.STDOUT,
                                cwd=cwd)
        _, status, usage = os.wait4(proc.pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        sys.exit(f"rlhf {' '.join(words)} exited with {code}: see {logs / name}.log")
    return {"seconds": time.perf_counter() - start, "max_rss_mb": usage.ru_maxrss / 1024}


def finished(run_dir: Path) -> bool:
    return (run_dir / "manifest.json").is_file()


def seconds_per_iteration(run_dir: Path) -> float:
    """From metrics.jsonl's timestamps: (last − first) / (iterations − 1), start-up and saving left out."""
    times = [json.loads(line)["time"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return (times[-1] - times[0]) / max(1, len(times) - 1)


def run_seed(root: Path, seed: int, lengths: list[int]) -> dict:
    """Every stage of one seed (reused when finished), then its eval; returns the eval report."""
    where = root / f"seed{seed}"
    common = [f"root={where}", f"seed={seed}"]
    if not finished(where / "base" / "sft"):
        rlhf("sft", "experiment=base", *common, cwd=where)
    if not finished(where / "base" / "reward"):
        rlhf("reward", "experiment=base", *common, cwd=where)
    if not finished(where / "ens" / "reward"):
        rlhf("reward", "experiment=ens", f"reward.ensemble={ENSEMBLE}", f"model.name_or_path={where / 'base' / 'sft'}",
             *common, cwd=where)
    names = []
    for n in lengths:
        for kind, overrides in KINDS.items():
            name = f"{kind}-{n}"
            names.append(name)
            if finished(where / name / "ppo"):
                continue
            reward = where / ("base" if kind.startswith("single") else "ens") / "reward"
            rlhf("ppo", f"experiment={name}", f"train.max_steps={n}", "train.checkpoint_every=10",
                 f"train.keep_checkpoints={n // 10}", f"model.policy={where / 'base' / 'sft'}",
                 f"model.reward={reward}", "overwrite=true", *overrides, *common, cwd=where)
    # eval: policies named as typed (relative to the seed's directory), the ensemble as the reward model; kept
    # when it measured these runs after they finished
    results = where / "base" / "eval" / "eval.json"
    newest = max((where / n / "ppo" / "manifest.json").stat().st_mtime for n in names)
    if not results.is_file() or results.stat().st_mtime < newest or \
            {f"{n}/ppo" for n in names} - {p["name"] for p in json.loads(results.read_text())["policies"]}:
        rlhf("eval", "experiment=base", f"policies=[base/sft,{','.join(f'{n}/ppo' for n in names)}]",
             f"reward.model={where / 'ens' / 'reward'}", *common, cwd=where)
    return json.loads(results.read_text())


def mean_se(values: list[float]) -> tuple[float, float]:
    """The mean and its standard error across seeds (0 for one seed)."""
    m = statistics.fmean(values)
    return m, (statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else 0.0)


def flat_curve_drop(ses: list[float], draws: int = 4000) -> float:
    """What final − peak a curve that does not move at all would show on average, its checkpoints measured with
    these standard errors: E[x_last − max_j x_j], x_j ~ N(0, se_j²) independent (seeded simulation). The peak of
    noisy points is biased upwards, so this is the noise floor of `final − peak`."""
    import random

    rng = random.Random(0)
    total = 0.0
    for _ in range(draws):
        xs = [rng.gauss(0.0, se) for se in ses]
        total += xs[-1] - max(xs)
    return total / draws


def per_run(report: dict, name: str, root: Path, seed: int) -> dict:
    row = next(p for p in report["policies"] if p["name"] == f"{name}/ppo")
    curve = report["curves"][f"{name}/ppo"]
    peak = max(curve[1:], key=lambda c: c["gold"])  # the checkpoints (step 0 is the SFT reference)
    return {"gold": row["gold"], "gold_se": row["gold_se"], "peak_gold": peak["gold"], "peak_step": peak["step"],
            "drop": row["gold"] - peak["gold"], "flat_drop": flat_curve_drop([c["gold_se"] for c in curve[1:]]),
            "kl": row["kl"], "ensemble_std": row.get("ensemble_std"),
            "seconds_per_iteration": seconds_per_iteration(root / f"seed{seed}" / name / "ppo"),  # (json only)
            "curve": [{k: c[k] for k in ("step", "kl", "gold", "score")} for c in curve]}


def table(rows: dict, seeds: list[int], lengths: list[int]) -> list[str]:
    def cell(values: list[float], signed: bool = False) -> str:
        m, se = mean_se(values)
        return f"{m:+.3f} ± {se:.3f}" if signed else f"{m:.3f} ± {se:.3f}"

    lines = [f"seeds {', '.join(map(str, seeds))}: mean ± standard error across seeds; gold on 256 held-out prompts",
             "", "| reward | iterations | gold (final) | gold (peak) | final − peak | (a flat curve) | vs single (final) | "
                 "KL (final) | member std (final) |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for n in lengths:
        base = [rows[(s, f"single-{n}")]["gold"] for s in seeds]
        for kind in KINDS:
            r = [rows[(s, f"{kind}-{n}")] for s in seeds]
            gain = [x["gold"] - b for x, b in zip(r, base)]
            lines.append(f"| {kind} | {n} | {cell([x['gold'] for x in r])} | {cell([x['peak_gold'] for x in r])} "
                         f"(it. {', '.join(str(x['peak_step']) for x in r)}) | {cell([x['drop'] for x in r], True)} | "
                         f"{statistics.fmean(x['flat_drop'] for x in r):+.3f} | "
                         f"{'' if kind == 'single' else cell(gain, True)} | {cell([x['kl'] for x in r])} | "
                         f"{cell([x['ensemble_std'] for x in r])} |")
    return lines


def draw(rows: dict, seeds: list[int], lengths: list[int], path: Path) -> None:
    """Gold against KL, the seeds' mean at each checkpoint, one line per reward, one panel per run length."""
    from rlhf_cli.charts import figure

    fig = figure(5.2 * len(lengths), 4.0)
    axes = fig.subplots(1, len(lengths), squeeze=False)[0]
    for ax, n in zip(axes, lengths):
        for i, kind in enumerate(KINDS):
            curves = [rows[(s, f"{kind}-{n}")]["curve"] for s in seeds]
            xs = [statistics.fmean(c[j]["kl"] for c in curves) for j in range(len(curves[0]))]
            ys = [statistics.fmean(c[j]["gold"] for c in curves) for j in range(len(curves[0]))]
            ax.plot(xs, ys, marker="o", markersize=3, label=kind if kind != "single_std" else "single (std.)",
                    color=f"C{i}")
            ax.annotate(str(curves[0][-1]["step"]), (xs[-1], ys[-1]), textcoords="offset points", xytext=(4, 0),
                        fontsize="x-small", color="0.35")
        ax.set(title=f"{n} PPO iterations", xlabel="KL to the SFT policy (nats per response)", ylabel="gold score")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize="small")
    fig.suptitle(f"single reward model vs an ensemble of {ENSEMBLE} (mean of seeds {', '.join(map(str, seeds))}; "
                 f"points every 10 iterations)")
    fig.savefig(path)


def cost(root: Path) -> None:
    """Reward-stage seconds for ensemble 1 and 4, full and LoRA members; PPO seconds per iteration and peak memory
    with one reward model, 4 full members and 4 LoRA members on one base, for a full and a LoRA policy; one
    process at a time."""
    where = root / "cost"
    common = [f"root={where}", "seed=0"]
    if not finished(where / "base" / "sft"):
        rlhf("sft", "experiment=base", *common, cwd=where)
    reward_s, ppo_s = {}, {}
    for lora in (0, 8):
        for k in (1, ENSEMBLE):
            reward_s[(lora, k)] = rlhf("reward", f"experiment=reward-k{k}-r{lora}", f"reward.ensemble={k}",
                                       f"model.name_or_path={where / 'base' / 'sft'}", f"model.lora.r={lora}",
                                       "overwrite=true", *common, cwd=where)["seconds"]
    scorers = {"1 reward model": "reward-k1-r0", f"{ENSEMBLE} full members": f"reward-k{ENSEMBLE}-r0",
               f"{ENSEMBLE} LoRA members on one base": f"reward-k{ENSEMBLE}-r8"}
    for lora in (0, 8):
        for label, reward in scorers.items():
            name = f"ppo-{reward}-policy-r{lora}"
            usage = rlhf("ppo", f"experiment={name}", "train.max_steps=20", f"model.policy={where / 'base' / 'sft'}",
                         f"model.reward={where / reward / 'reward'}", f"model.lora.r={lora}", "overwrite=true",
                         *common, cwd=where)
            ppo_s[(lora, label)] = (seconds_per_iteration(where / name / "ppo"), usage["max_rss_mb"])
    lines = ["| | full | LoRA (r=8) |", "|---|---:|---:|"]
    for k in (1, ENSEMBLE):
        lines.append(f"| `rlhf reward reward.ensemble={k}`: seconds ({k} x 500 steps) | {reward_s[(0, k)]:.1f} | "
                     f"{reward_s[(8, k)]:.1f} |")
    for label in scorers:
        full, lo = ppo_s[(0, label)], ppo_s[(8, label)]
        lines.append(f"| `rlhf ppo` with {label}: s / iteration (peak RSS) | {full[0]:.2f} ({full[1]:.0f} MB) | "
                     f"{lo[0]:.2f} ({lo[1]:.0f} MB) |")
    (root / "cost.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default="runs/ensembles")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--iterations", type=int, nargs="+", default=[60, 180])
    parser.add_argument("--cost", action="store_true", help="the cost figures instead (see above)")
    args = parser.parse_args()
    root = Path(args.root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    if args.cost:
        return cost(root)
    rows = {}
    for seed in args.seeds:
        report = run_seed(root, seed, args.iterations)
        for n in args.iterations:
            for kind in KINDS:
                rows[(seed, f"{kind}-{n}")] = per_run(report, f"{kind}-{n}", root, seed)
    lines = table(rows, args.seeds, args.iterations)
    (root / "compare.json").write_text(json.dumps(
        {"seeds": args.seeds, "iterations": args.iterations, "ensemble": ENSEMBLE,
         "runs": {f"seed{s}/{name}": r for (s, name), r in rows.items()}}, indent=2))
    (root / "compare.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    try:
        draw(rows, args.seeds, args.iterations, root / "ensembles.png")
        print(f"\ngold against KL: {root / 'ensembles.png'}; each seed's curves: "
              f"{root}/seed<s>/base/eval/charts/overoptimisation.png")
    except ImportError:
        print("(matplotlib is not installed: no chart; pip install 'rlhf_cli[plots]')")


if __name__ == "__main__":
    main()
