"""`rlhf report`: one self-contained HTML page of an experiment, built from its run directories.

    rlhf report experiment=demo      # -> runs/demo/report.html (`rlhf pipeline` builds it at the end)

For each stage found under <root>/<experiment>/ (sft, reward, ppo: a finished artifact; eval: eval.json), in the
pipeline's order: its headline numbers (all final metrics one click further), the config keys where it differs
from the stage's defaults (run keys such as `logger` or the cadences aside), its charts (drawn again from
metrics.jsonl or eval.json, rlhf_cli.charts, and inlined as PNG data) and sample responses. A stage that was swept
(`-m`) shows its sweep table (sweep.json) instead. The page has no external links: mail it, open it offline.

Reads top to bottom: find the stages, one section each, write the page (temporary name, then rename).
"""

from __future__ import annotations

import base64
import html
import json
import time
from dataclasses import asdict
from pathlib import Path

from rlhf_cli import artifacts, charts
from rlhf_cli.config import ReportConfig, compose_stage, config_diff, finalize, flatten
from rlhf_cli.engine.logging import console, fmt, summary_table
from rlhf_cli.errors import ArtifactError
from rlhf_cli.stagespec import SPECS, pipeline_order

PAGE = "report.html"


def run(cfg: ReportConfig) -> dict:
    exp_dir = Path(cfg.run_dir)
    con = console(True)
    found = {stage: exp_dir / stage for stage in pipeline_order() if (exp_dir / stage).is_dir()}
    sections, pngs = [], []
    for stage, run_dir in found.items():
        section, drawn = stage_section(stage, run_dir, cfg)
        if section:
            sections.append((stage, section))
            pngs += drawn
    if not sections:
        if exp_dir.is_dir() and not any(exp_dir.iterdir()):
            exp_dir.rmdir()  # Hydra made it for this run: leave no trace of a refused one
        raise ArtifactError(f"{exp_dir} holds no finished stage to report on",
                            hint=f"run `rlhf pipeline experiment={cfg.experiment}` first (or set root= and "
                                 f"experiment= to where the runs are)")
    page = render_page(cfg.experiment, exp_dir, sections)
    try:
        artifacts.write_text_atomic(exp_dir / PAGE, page)
    except OSError as exc:
        raise artifacts.storage_error(PAGE, exc, hint=f"check that {exp_dir} is writable") from exc
    con.print(summary_table("report", {"page": str(exp_dir / PAGE), "stages": ", ".join(found),
                                       "charts": "\n".join(str(p) for p in pngs) or charts.MISSING}))
    return {"report": str(exp_dir / PAGE), "charts": [str(p) for p in pngs]}


# ---- one section per stage ----------------------------------------------------------------------------------------

def stage_section(stage: str, run_dir: Path, cfg: ReportConfig) -> tuple[str, list[Path]]:
    """(the stage's HTML, the charts drawn); ("", []) when the directory holds nothing finished."""
    if (run_dir / "sweep.json").is_file() and not artifacts.is_finished(run_dir):
        return section(f"{stage} (a sweep)", [sweep_section(stage, run_dir)]), []
    spec = SPECS[stage]
    if not spec.artifact:  # eval: its results file, one row per policy
        if not (run_dir / spec.results).is_file():
            return "", []
        pngs = charts.draw(stage, run_dir)
        return eval_section(json.loads((run_dir / spec.results).read_text()), run_dir, pngs, cfg), pngs
    if not artifacts.is_finished(run_dir):
        return "", []
    manifest = artifacts.read_manifest(run_dir)
    pngs = charts.draw(stage, run_dir)
    metrics = manifest.get("metrics", {})
    heads = [(m.label, metrics[m.key]) for m in spec.headline if metrics.get(m.key) is not None]
    rest = {k: v for k, v in metrics.items() if not isinstance(v, (dict, list))}
    body = [f"<p class=where>{esc(run_dir)} · finished {esc(manifest.get('created', '?'))} · base "
            f"{esc(manifest.get('base_model') or '-')}</p>",
            kv_table(dict(heads)), details("all final metrics", kv_table(rest)),
            diff_section(stage, manifest.get("config", {})), images(pngs),
            samples_table(read_samples(spec, run_dir, cfg.samples))]
    if (run_dir / "sweep.json").is_file():  # a sweep beside the artifact, into its sub-directories
        body.append(sweep_section(stage, run_dir))
    return section(stage, body), pngs


def eval_section(report: dict, run_dir: Path, pngs: list[Path], cfg: ReportConfig) -> str:
    rows = []
    gold = any("gold" in p for p in report["policies"])
    keys = ["score", *(["gold"] if gold else []), "kl", "win_rate"]
    for p in report["policies"]:
        rows.append([p["name"], *[pm(p, k) for k in keys], fmt(p.get("response_length")), fmt(p.get("stop_rate"))])
    n = report["prompts"].get("samples_per_prompt", 1)
    scored = rewards_line(report)
    body = [f"<p class=where>{esc(run_dir)} · {report['prompts']['count']} held-out prompts from "
            f"{esc(report['prompts']['source'])}, {n} response{'s' if n != 1 else ''} each; {esc(scored)}; "
            f"win rate against {esc(report['baseline'])} (mean ± standard error)</p>",
            table(["policy", *[LABELS[k] for k in keys], "length", "stop rate"], rows)]
    extra = sorted({k for p in report["policies"] for k in p
                    if k.startswith(("reward/", "pass@")) and not k.endswith("_se") and k != "reward/reward_model"},
                   key=lambda k: (k.split("/", 1)[-1], k))
    if extra:  # each reward function's mean and every pass@k (reward.functions, samples_per_prompt)
        body.append(table(["policy", *extra], [[p["name"], *[pm(p, k) for k in extra]] for p in report["policies"]]))
    ensemble = "ensemble_std" in report["policies"][0]  # a reward ensemble scored: its aggregate, mean, disagreement
    if ensemble:
        how, members = report["rewards"].get("ensemble_aggregation", "mean"), report["rewards"].get("ensemble_members")
        body.append(f"<h3>reward ensemble: {members or 'several'} members, each standardised</h3>")
        body.append(table(["policy", f"score ({how})", "members' mean", "members' std (disagreement)"],
                          [[p["name"], pm(p, "reward/reward_model"), pm(p, "ensemble_mean"), pm(p, "ensemble_std")]
                           for p in report["policies"]]))
    for name, curve in report.get("curves", {}).items():
        body.append(f"<h3>over-optimisation curve of {esc(name)} (step 0: the reference)</h3>")
        body.append(table(["step", "KL", "proxy score", *(["members' std"] if ensemble else []),
                           *(["gold"] if gold else [])],
                          [[p["step"], pm(p, "kl"), pm(p, "score"), *([pm(p, "ensemble_std")] if ensemble else []),
                            *([pm(p, "gold")] if gold else [])] for p in curve]))
    body.append(images(pngs, wide=True))
    for p in report["policies"]:
        body.append(details(f"samples of {p['name']}", samples_table(p.get("samples", [])[:cfg.samples])))
    return section("eval", body)


LABELS = {"score": "reward-model score", "gold": "gold score", "kl": "KL to the reference", "win_rate": "win rate"}


def rewards_line(report: dict) -> str:
    """What scored the responses: the reward model (or none) and the reward functions with their weights."""
    rewards = report.get("rewards") or {}
    model = f"reward model {report['reward_model']}" if report.get("reward_model") else "no reward model"
    functions = rewards.get("functions") or []
    return model + (f"; reward functions {', '.join(functions)}, weights {rewards.get('weights')}" if functions else "")


def sweep_section(stage: str, run_dir: Path) -> str:
    sweep = json.loads((run_dir / "sweep.json").read_text())
    metrics = sweep.get("columns", [])
    rows = [[job["job"], job["status"], *[fmt(job["metrics"].get(k)) for k in metrics]] for job in sweep["jobs"]]
    return (f"<h3>sweep of {len(rows)} jobs</h3><p class=where>{esc(run_dir)} · sorted by "
            f"{esc(sweep.get('headline', ''))}, {esc(sweep.get('best', ''))} first</p>" +
            table(["job", "status", *metrics], rows))


def diff_section(stage: str, config: dict) -> str:
    """The keys whose value differs from what `rlhf <stage>` composes with no override."""
    try:
        defaults = asdict(stage_defaults(stage))
    except Exception as exc:  # noqa: BLE001 - a report of an older run still renders, saying why
        return f"<p>config: the defaults could not be composed ({esc(exc)})</p>"
    changed = config_diff(defaults, config)
    if not changed:
        return "<h3>config</h3><p>the defaults, no key changed</p>" + details("resolved config", kv_table(
            flatten(config)))
    return ("<h3>config: keys that differ from the defaults</h3>" +
            table(["key", "default", "this run"], [[k, a, b] for k, (a, b) in changed.items()]) +
            details("resolved config", kv_table(flatten(config))))


def stage_defaults(stage: str):
    """The typed config `rlhf <stage>` runs with when given no override."""
    return finalize(compose_stage(stage, []))


def read_samples(spec, run_dir: Path, n: int) -> list[dict]:
    """The first `n` rows of the stage's samples file (ppo: of the last iteration that wrote any)."""
    path = run_dir / spec.samples
    if not spec.samples or not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if spec.samples_last_step and rows:
        last = rows[-1].get("step")
        rows = [r for r in rows if r.get("step") == last]
    return rows[:n]


# ---- HTML --------------------------------------------------------------------------------------------------------

STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;max-width:1100px;color:#222;
padding:0 1em} h1{margin-bottom:.2em} h2{border-bottom:2px solid #ddd;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;margin:.6em 0;font-size:14px} td,th{border:1px solid #ddd;padding:4px 8px;
text-align:left;vertical-align:top} th{background:#f4f4f4} td.n{text-align:right;font-variant-numeric:tabular-nums}
.where{color:#666;font-size:13px} img{max-width:100%;border:1px solid #eee;margin:4px}
.charts{display:flex;flex-wrap:wrap} .charts img{width:48%} details{margin:.4em 0} summary{cursor:pointer;color:#036}
nav a{margin-right:1em}
"""


def render_page(experiment: str, exp_dir: Path, sections: list[tuple[str, str]]) -> str:
    """The page: a title, links to each stage's section, the sections ([(stage, its HTML)])."""
    links = " ".join(f'<a href="#{stage}">{stage}</a>' for stage, _ in sections)
    return (f"<!doctype html><html><head><meta charset=utf-8><title>rlhf report: {esc(experiment)}</title>"
            f"<style>{STYLE}</style></head><body><h1>rlhf report: {esc(experiment)}</h1>"
            f"<p class=where>{esc(exp_dir)} · built {time.strftime('%Y-%m-%d %H:%M:%S')}</p><nav>{links}</nav>"
            + "".join(f'<section id="{stage}">{body}</section>' for stage, body in sections) + "</body></html>\n")


def section(title: str, body: list[str]) -> str:
    return f"<h2>{esc(title)}</h2>" + "".join(body)


def esc(value) -> str:
    return html.escape(str(value))


def cell(value) -> str:
    number = isinstance(value, (int, float)) and not isinstance(value, bool) or " ± " in str(value)
    return f"<td class=n>{esc(fmt(value))}</td>" if number else f"<td>{esc(fmt(value))}</td>"


def table(headers: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(cell(v) for v in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def kv_table(values: dict) -> str:
    return table(["", ""], [[k, v] for k, v in values.items()]).replace("<tr><th></th><th></th></tr>", "")


def details(summary: str, inner: str) -> str:
    return f"<details><summary>{esc(summary)}</summary>{inner}</details>"


def pm(row: dict, key: str) -> str:
    return f"{fmt(row[key])} ± {row.get(key + '_se', 0.0):.2g}" if isinstance(row.get(key), (int, float)) else "-"


def images(pngs: list[Path], wide: bool = False) -> str:
    """The charts inlined as PNG data, two abreast (`wide`: one per row), or what drawing them needs."""
    if not charts.available():
        return f"<p class=where>{esc(charts.MISSING)}</p>"
    inlined = "".join(f'<img alt="{esc(p.stem)}"{" style=width:100%" if wide else ""} src="data:image/png;base64,'
                      f'{base64.b64encode(p.read_bytes()).decode()}">' for p in pngs)
    return f"<div class=charts>{inlined}</div>"


def samples_table(samples: list[dict]) -> str:
    if not samples:
        return ""
    keys = [k for k in ("prompt", "response", "score", "gold") if k in samples[0]]
    return "<h3>samples</h3>" + table(keys, [[s.get(k) for k in keys] for s in samples])
