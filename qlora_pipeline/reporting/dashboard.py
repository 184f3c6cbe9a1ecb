"""dashboard.html: one self-contained page (Plotly.js inlined, opens offline), one tab per dataset, a tab
comparing the datasets per split, and a training tab when the run has a training log.

Figures are plain Plotly JSON specs built from the evaluation_results.json files, the same data the PNGs
draw. The page records any JavaScript error in a visible banner and in `data-errors` on <body>, and the
number of rendered plots in `data-rendered`, so a headless browser check can read both from the DOM.
"""

from __future__ import annotations

import html
import json
import math
from pathlib import Path
from typing import Any

from qlora_pipeline.evaluation.metrics import COMPARED, HEADLINE, metric_cell
from qlora_pipeline.evaluation.results import collect_results
from qlora_pipeline.reporting.figures import TRAINING_LOGS, read_training_log
from qlora_pipeline.reporting.generations import dashboard_tabs

HOOK = """window.dashboardErrors = [];
function reportError(message) {
  window.dashboardErrors.push(String(message));
  document.addEventListener('DOMContentLoaded', showErrors);
  if (document.body) { showErrors(); }
}
function showErrors() {
  document.body.setAttribute('data-errors', String(window.dashboardErrors.length));
  var banner = document.getElementById('dashboard-errors');
  banner.hidden = false;
  banner.textContent = 'JavaScript errors: ' + window.dashboardErrors.join(' | ');
}
window.addEventListener('error', function (e) { reportError(e.message || e); });
window.addEventListener('unhandledrejection', function (e) { reportError(e.reason); });"""

RENDER = """var specs = JSON.parse(document.getElementById('figure-specs').textContent);
var pending = Object.keys(specs).map(function (id) {
  return Plotly.newPlot(id, specs[id].data, specs[id].layout, {responsive: true, displaylogo: false});
});
Promise.all(pending).then(function () {
  document.body.setAttribute('data-rendered', String(document.querySelectorAll('.js-plotly-plot').length));
});
function showTab(name) {
  document.querySelectorAll('section.tab').forEach(function (s) { s.hidden = s.id !== 'tab-' + name; });
  document.querySelectorAll('nav button').forEach(function (b) { b.classList.toggle('on', b.dataset.tab === name); });
  document.querySelectorAll('#tab-' + name + ' .js-plotly-plot').forEach(function (d) { Plotly.Plots.resize(d); });
}
showTab(document.querySelector('nav button').dataset.tab);"""

STYLE = """body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
nav button { padding: .4em 1em; margin-right: .3em; border: 1px solid #888; background: #f4f4f4; cursor: pointer; }
nav button.on { background: #246; color: white; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(460px, 1fr)); gap: 1em; }
.plot { height: 380px; } table { border-collapse: collapse; margin: .8em 0; font-size: 90%; }
td, th { border: 1px solid #ccc; padding: .25em .5em; text-align: left; vertical-align: top; }
#dashboard-errors { background: #fdd; border: 1px solid #c00; padding: .5em; }"""


def layout(title: str, x: str, y: str, **extra: Any) -> dict[str, Any]:
    return {"title": {"text": title}, "xaxis": {"title": {"text": x}}, "yaxis": {"title": {"text": y}}, **extra}


def figure_specs(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The interactive views for one dataset/split: confusion, ROC, PR, reliability, scores, by length."""
    names, primary, curves = results["label_names"], results["primary_head"], results["curves"]
    matrix = results["heads"][primary]["confusion_matrix"]
    specs: dict[str, dict[str, Any]] = {
        "confusion": {
            "data": [
                {
                    "type": "heatmap",
                    "z": matrix,
                    "x": names,
                    "y": names,
                    "colorscale": "Blues",
                    "text": matrix,
                    "texttemplate": "%{text}",
                    "hovertemplate": "true %{y}<br>predicted %{x}: %{z}",
                }
            ],
            "layout": layout(
                f"Confusion matrix — {primary}",
                "predicted",
                "true",
                yaxis={"autorange": "reversed", "title": {"text": "true"}},
            ),
        },
    }
    for kind, (x, y), title in (("roc", ("fpr", "tpr"), "ROC"), ("pr", ("recall", "precision"), "Precision-recall")):
        traces = [
            {"type": "scatter", "mode": "lines", "x": c[x], "y": c[y], "name": f"{head} {name}"}
            for head, hc in curves.items()
            for name, c in hc[kind].items()
        ]
        if traces:
            specs[kind] = {"data": traces, "layout": layout(title, x, y)}
    specs["reliability"] = {
        "data": [
            {
                "type": "scatter",
                "mode": "lines",
                "x": [0, 1],
                "y": [0, 1],
                "name": "perfect",
                "line": {"dash": "dash", "color": "grey"},
            }
        ]
        + [
            {
                "type": "scatter",
                "mode": "lines+markers",
                "name": f"{head} (ECE {results['heads'][head]['ece']:.3f})",
                "x": [b["confidence"] for b in hc["reliability"]],
                "y": [b["accuracy"] for b in hc["reliability"]],
                "text": [f"n = {b['n']}" for b in hc["reliability"]],
            }
            for head, hc in curves.items()
        ],
        "layout": layout("Reliability (top-label confidence)", "mean confidence", "accuracy"),
    }
    scores = curves[primary]["scores"]
    centres = [(a + b) / 2 for a, b in zip(scores["edges"][:-1], scores["edges"][1:], strict=True)]
    specs["scores"] = {
        "data": [
            {"type": "bar", "x": centres, "y": counts, "name": f"true {name}", "opacity": 0.6}
            for name, counts in scores["counts"].items()
        ],
        "layout": layout(f"Score distribution by class — {primary}", scores["score"], "examples", barmode="overlay"),
    }
    buckets = results["by_length"]
    specs["length"] = {
        "data": [
            {"type": "bar", "x": [b["chars"] for b in buckets], "y": [b[m] for b in buckets], "name": m}
            for m in ("accuracy", "macro_f1")
        ],
        "layout": layout(f"By text length — {primary}", "characters", "score", barmode="group"),
    }
    return specs


def comparison_spec(per_dataset: dict[str, dict[str, Any]], split: str) -> dict[str, Any]:
    """Grouped bars of the compared metrics for every dataset and head of one split, 95% intervals as error bars."""
    traces = []
    for dataset in sorted(per_dataset):
        for head, metrics in per_dataset[dataset]["heads"].items():
            values = [metrics.get(k) for k in COMPARED]
            intervals = [(metrics.get("ci") or {}).get(k) for k in COMPARED]
            above = [ci[1] - v if ci and v is not None else 0 for v, ci in zip(values, intervals, strict=True)]
            below = [v - ci[0] if ci and v is not None else 0 for v, ci in zip(values, intervals, strict=True)]
            error = {"type": "data", "symmetric": False, "array": above, "arrayminus": below}
            traces.append(
                {"type": "bar", "x": list(COMPARED), "y": values, "name": f"{dataset} · {head}", "error_y": error}
            )
    return {"data": traces, "layout": layout(f"Metrics per dataset — {split}", "metric", "score", barmode="group")}


def training_specs(rows: list[dict[str, Any]], source: str) -> dict[str, dict[str, Any]]:
    """Loss curves, and every other logged number, against the optimizer step (as the PNG draws them)."""
    series: dict[str, tuple[list[float], list[float]]] = {}
    for row in rows:
        for key, value in row.items():
            number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            if key != "step" and "step" in row and number:  # a diverged loss (NaN) is left out, not drawn as 0
                series.setdefault(key, ([], []))[0].append(row["step"])
                series[key][1].append(value)
    specs = {}
    for name, title, keep in (("loss", "Training and validation loss", True), ("value", "Other logged values", False)):
        traces = [
            {"type": "scatter", "mode": "lines+markers", "x": steps, "y": values, "name": key}
            # The learning rate is orders of magnitude below the rest: its own axis on the right.
            | ({"yaxis": "y2"} if key == "learning_rate" else {})
            for key, (steps, values) in sorted(series.items())
            if ("loss" in key) == keep
        ]
        if traces:
            right = {"title": {"text": "learning rate"}, "overlaying": "y", "side": "right", "rangemode": "tozero"}
            extra = {"yaxis2": right, "legend": {"x": 1.15}} if any("yaxis" in t for t in traces) else {}
            specs[name] = {"data": traces, "layout": layout(f"{title} ({source})", "step", name, **extra)}
    return specs


def metrics_table(results: dict[str, Any], label: str = "head") -> str:
    """Headline metrics of every head; `results` may also be {"heads": {row label: metrics}} for other rows."""
    head = "".join(f"<th>{html.escape(k)}</th>" for k in (label, *HEADLINE))
    rows = "".join(
        "<tr><td>"
        + html.escape(h)
        + "</td>"
        + "".join(f"<td>{html.escape(metric_cell(m, k, True))}</td>" for k in HEADLINE)
        + "</tr>"
        for h, m in results["heads"].items()
    )
    return f"<table><tr>{head}</tr>{rows}</table>"


def errors_table(results: dict[str, Any]) -> str:
    rows = "".join(
        f"<tr><td>{e['confidence']:.3f}</td><td>{html.escape(e['label'])}</td><td>{html.escape(e['prediction'])}</td>"
        f"<td>{html.escape(e['text'][:400])}</td></tr>"
        for e in results["confident_errors"]
    )
    header = "<tr><th>confidence</th><th>label</th><th>prediction</th><th>text</th></tr>"
    return f"<table>{header}{rows}</table>" if rows else "<p>No wrong predictions.</p>"


def plots(specs: dict[str, Any], prefix: str, named: dict[str, dict[str, Any]]) -> str:
    """Register each spec under a unique plot id; the grid of divs Plotly draws them into."""
    divs = []
    for name, spec in named.items():
        specs[f"{prefix}-{name}"] = spec
        divs.append(f'<div class="plot" id="{prefix}-{name}"></div>')
    return f'<div class="grid">{"".join(divs)}</div>'


def build_page(
    collected: dict[str, dict[str, dict[str, Any]]],
    title: str,
    training: tuple[str, list[dict[str, Any]]] | None = None,
    extra: list[tuple[str, str, str]] | None = None,
) -> str:
    """The dashboard page for {split: {dataset: evaluation_results}}, an optional (log name, training log rows) and
    `extra` tabs (key, label, html body: an instruction run's generations)."""
    from plotly.offline import get_plotlyjs

    datasets = sorted({d for per_dataset in collected.values() for d in per_dataset})
    specs: dict[str, Any] = {}
    sections = []
    for index, dataset in enumerate(datasets):
        parts = [f"<h2>{html.escape(dataset)}</h2>"]
        for split, per_dataset in collected.items():
            if dataset not in per_dataset:
                continue
            results = per_dataset[dataset]
            parts += [
                f"<h3>{html.escape(split)} (n = {results['heads'][results['primary_head']]['n']})</h3>",
                metrics_table(results),
                plots(specs, f"plot-{index}-{split}", figure_specs(results)),
                "<h4>Most confidently wrong</h4>",
                errors_table(results),
            ]
        sections.append(f'<section class="tab" id="tab-{index}">{"".join(parts)}</section>')
    tabs = [(str(i), d) for i, d in enumerate(datasets)]
    if collected:
        parts = ["<h2>Across datasets</h2>"]
        for split, per_dataset in collected.items():
            rows = {f"{d} · {h}": m for d in sorted(per_dataset) for h, m in per_dataset[d]["heads"].items()}
            parts += [f"<h3>{html.escape(split)}</h3>", metrics_table({"heads": rows}, "dataset · head")]
            parts.append(plots(specs, f"plot-all-{split}", {"comparison": comparison_spec(per_dataset, split)}))
        sections.append(f'<section class="tab" id="tab-all">{"".join(parts)}</section>')
        tabs.append(("all", "Across datasets"))
    for key, label, body in extra or []:
        sections.append(f'<section class="tab" id="tab-{key}">{body}</section>')
        tabs.append((key, label))
    if training and training[1]:
        graphs = plots(specs, "plot-training", training_specs(training[1], training[0]))
        sections.append(f'<section class="tab" id="tab-training"><h2>Training</h2>{graphs}</section>')
        tabs.append(("training", "Training"))
    buttons = "".join(
        f'<button data-tab="{key}" onclick="showTab(\'{key}\')">{html.escape(label)}</button>' for key, label in tabs
    )
    payload = json.dumps(specs, ensure_ascii=False, allow_nan=False).replace("</", "<\\/")
    return (
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{STYLE}</style><script>{HOOK}</script><script>{get_plotlyjs()}</script></head>"
        f'<body data-errors="0" data-rendered="0"><div id="dashboard-errors" hidden></div>'
        f"<h1>{html.escape(title)}</h1><nav>{buttons}</nav>{''.join(sections)}"
        f'<script type="application/json" id="figure-specs">{payload}</script><script>{RENDER}</script></body></html>'
    )


def write_dashboard(run_dir: Path, collected: dict[str, dict[str, dict[str, Any]]] | None = None) -> Path:
    """dashboard.html of a run (`collected`: its `collect_results`, when the caller has read them already)."""
    if collected is None:
        collected = collect_results(run_dir)
    logs = [run_dir / name for name in TRAINING_LOGS if (run_dir / name).is_file()]
    training = (logs[0].name, read_training_log(logs[0])) if logs else None
    path = run_dir / "dashboard.html"
    page = build_page(collected, f"Dashboard — {run_dir.name}", training, dashboard_tabs(run_dir))
    path.write_text(page, encoding="utf-8")
    return path
