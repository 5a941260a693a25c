"""The PNG charts of a run directory, drawn from what the stage wrote there: `draw(stage, run_dir)`.

- sft, reward, ppo: curves of metrics.jsonl against the step (ppo: the iteration), one chart per quantity, in
  <run dir>/charts/<stem>.png (the stage's spec, stagespec.SPECS, says which series each chart holds; a series the
  run did not log is left out, and a chart with none is not drawn).
- eval: from eval.json, the SFT/PPO comparison as bars with standard-error bars (charts/comparison.png) and, for
  each PPO run whose checkpoints were measured, the over-optimisation curve (Gao et al. 2022): the reward model's
  (proxy) score and the gold score, with standard-error bars, against the KL to the reference
  (charts/overoptimisation.png).

Each stage draws its charts when it finishes, and `rlhf report` asks for them again. Each PNG records what it was
drawn from (a hash of the source file's bytes, the chart's spec and this module's code, in a PNG text chunk), so
asking again returns it without redrawing when nothing changed, and redraws it when anything did (a resumed run's
longer metrics.jsonl, a new eval.json, a changed chart). Drawing needs matplotlib, the `plots` extra: without it
`draw` returns no charts and `MISSING` says what to install. A chart is written under a temporary name and renamed,
so a reader never sees half a PNG.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import struct
from pathlib import Path

from rlhf_cli import artifacts
from rlhf_cli.stagespec import SPECS, Chart

MISSING = "charts need matplotlib: pip install 'rlhf-cli[plots]'"
DIR = "charts"

def available() -> bool:
    return importlib.util.find_spec("matplotlib") is not None


def draw(stage: str, run_dir: Path) -> list[Path]:
    """Every chart of `stage`'s spec from the files in `run_dir` (metrics.jsonl, or the stage's results file such as
    eval.json), written to run_dir/charts/; the paths written ([] without matplotlib or without anything to draw)."""
    run_dir, spec = Path(run_dir), SPECS[stage]
    if not available():
        return []
    files = {"metrics": run_dir / "metrics.jsonl", "results": run_dir / spec.results if spec.results else None}
    raw: dict = {}     # source -> its bytes (None when absent)
    loaded: dict = {}  # source -> its rows (metrics) or object (results)
    out = []
    for chart in spec.charts:
        source, drawer = DRAWERS[chart.kind]
        if source not in raw:
            raw[source] = files[source].read_bytes() if files[source] and files[source].is_file() else None
        if not raw[source]:
            continue
        png, stamp = run_dir / DIR / f"{chart.stem}.png", drawn_from(chart, spec.step_unit, raw[source])
        if stamp_of(png) == stamp:  # drawn from these very bytes by this very code: nothing to redraw
            out.append(png)
            continue
        if source not in loaded:
            loaded[source] = (json.loads(raw[source]) if source == "results" else
                              [json.loads(line) for line in raw[source].decode().splitlines() if line.strip()])
        fig = drawer(chart, loaded[source], spec.step_unit) if loaded[source] else None
        if fig is not None:
            out.append(save(fig, png, stamp))
    return out


STAMP_KEY = "rlhf_cli.source"  # the PNG text chunk that records what a chart was drawn from
_code_hash: list[str] = []


def drawn_from(chart: Chart, xlabel: str, source: bytes) -> str:
    """sha256 of what a chart's pixels depend on: this module's code, the chart's spec, the source file's bytes."""
    if not _code_hash:
        _code_hash.append(hashlib.sha256(Path(__file__).read_bytes()).hexdigest())
    h = hashlib.sha256(f"{_code_hash[0]}\0{chart!r}\0{xlabel}\0".encode())
    h.update(source)
    return h.hexdigest()


def stamp_of(png: Path) -> str | None:
    """The STAMP_KEY text a PNG was saved with, or None (no such file or chunk, or not a PNG)."""
    try:
        with open(png, "rb") as f:
            if f.read(8) != b"\x89PNG\r\n\x1a\n":
                return None
            while len(header := f.read(8)) == 8:
                length, kind = struct.unpack(">I4s", header)
                if kind in (b"IDAT", b"IEND"):  # text chunks that matter come before the image data
                    return None
                data = f.read(length + 4)[:length]  # the chunk and its CRC
                if kind == b"tEXt" and data.startswith(STAMP_KEY.encode() + b"\0"):
                    return data[len(STAMP_KEY) + 1:].decode("latin-1")
    except OSError:
        return None
    return None


def lines_figure(chart: Chart, rows: list[dict], xlabel: str):
    """The chart's series of metrics.jsonl against the step (a series the run did not log left out), or None."""
    named = dict.fromkeys(k for r in rows for k in r if chart.prefix and k.startswith(chart.prefix))
    series = [*chart.series, *((key, key.removeprefix(chart.prefix)) for key in named)]
    lines = {label: [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
             for key, label in series}
    lines = {label: points for label, points in lines.items() if points}
    return line_chart(chart.title, lines, xlabel, chart.ylabel) if lines else None


def comparison_figure(chart: Chart, report: dict, _xlabel: str):
    policies = report.get("policies") or []
    return comparison_chart(policies, report.get("baseline", ""), chart.title) if policies else None


def curve_figure(chart: Chart, report: dict, _xlabel: str):
    return curve_chart(report["curves"], chart.title) if any(report.get("curves", {}).values()) else None


# Chart.kind -> (what it is drawn from: "metrics" = metrics.jsonl, "results" = the stage's results file, drawer)
DRAWERS = {"lines": ("metrics", lines_figure), "comparison": ("results", comparison_figure),
           "curve": ("results", curve_figure)}
_unknown = {c.kind for spec in SPECS.values() for c in spec.charts} - set(DRAWERS)
if _unknown:  # a stage spec's chart no drawer knows: fail at import, not as a missing PNG
    raise TypeError(f"charts: no drawer for chart kind(s) {sorted(_unknown)} (charts.DRAWERS)")


def figure(width: float = 6.4, height: float = 3.6):
    import logging

    logging.getLogger("matplotlib").setLevel(logging.WARNING)  # no "generated new fontManager" on a first run
    from matplotlib.figure import Figure  # no pyplot: no global state, no display needed

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def line_chart(title: str, lines: dict[str, list[tuple[float, float]]], xlabel: str, ylabel: str):
    fig = figure()
    ax = fig.subplots()
    for label, points in lines.items():
        xs, ys = zip(*points)
        ax.plot(xs, ys, label=label, marker="o" if len(xs) <= 20 else None, markersize=3)
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.grid(alpha=0.3)
    if len(lines) > 1:
        ax.legend(fontsize="small")
    return fig


def comparison_chart(policies: list[dict], baseline: str, title: str):
    keys = [(k, label) for k, label in (("score", "score (proxy)"), ("gold", "gold score"),
                                        ("kl", "KL to the reference"), ("win_rate", f"win rate vs {baseline}"))
            if all(isinstance(p.get(k), (int, float)) for p in policies)]
    fig = figure(3.2 * len(keys), 3.4)
    axes = fig.subplots(1, len(keys), squeeze=False)[0]
    names = [p["name"] for p in policies]
    colors = [f"C{i}" for i in range(len(policies))]
    for ax, (key, label) in zip(axes, keys):
        ax.bar(range(len(policies)), [p[key] for p in policies], yerr=[p.get(f"{key}_se", 0.0) for p in policies],
               capsize=4, color=colors)
        ax.set_xticks(range(len(policies)), [abbreviate(n) for n in names], rotation=20, fontsize="small")
        ax.set_title(label, fontsize="medium")
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(title)
    return fig


def curve_chart(curves: dict[str, list[dict]], title: str):
    """Proxy and gold score against KL, one line per PPO run, each point labelled with its iteration."""
    with_gold = all("gold" in p for points in curves.values() for p in points)
    panels = [("score", "reward-model (proxy) score")] + ([("gold", "gold score")] if with_gold else [])
    fig = figure(5.2 * len(panels), 3.8)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (key, label) in zip(axes, panels):
        for i, (name, points) in enumerate(curves.items()):
            xs, ys = [p["kl"] for p in points], [p[key] for p in points]
            ax.errorbar(xs, ys, xerr=[p.get("kl_se", 0.0) for p in points],
                        yerr=[p.get(f"{key}_se", 0.0) for p in points], marker="o", markersize=4, capsize=3,
                        label=abbreviate(name), color=f"C{i}")
            for p in points:
                ax.annotate(str(p["step"]), (p["kl"], p[key]), textcoords="offset points", xytext=(4, 4),
                            fontsize="x-small", color="0.35")
        ax.set(title=label, xlabel="KL to the reference (nats per response)", ylabel=key)
        ax.grid(alpha=0.3)
    if len(curves) > 1 or not with_gold:
        axes[0].legend(fontsize="small")
    fig.suptitle(title)
    return fig


def abbreviate(text: str, width: int = 28) -> str:
    """`text` in at most `width` characters: a long one keeps its beginning and its end, the middle becomes "…"
    (experiment_with_a_long_name/ppo -> experiment_w…name/ppo), so two names that differ at the end stay apart."""
    text = str(text)
    if len(text) <= width:
        return text
    tail = width // 2
    return text[:width - 1 - tail] + "…" + text[len(text) - tail:]


def save(fig, path: Path, stamp: str | None = None) -> Path:
    """The figure as a PNG at `path` (with `stamp` as its STAMP_KEY text), written under a temporary name and
    renamed (a StorageError if refused)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(tmp, format="png", metadata={STAMP_KEY: stamp} if stamp else None)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise artifacts.storage_error(f"the chart {path.name}", exc,
                                      hint="check that the run directory is writable and its disk has free space")
    return path

