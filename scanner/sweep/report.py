"""A sweep's report: one self-contained HTML page (plots as base64 PNG, no external assets), a JSON
summary and the rejects as JSON lines, side by side in the report folder, named by sweep and date."""

from __future__ import annotations

import base64
import html
import io
import json
import tempfile
from pathlib import Path

from ..detect import Scanner
from ..detectors import Detector
from ..errors import MemscanError
from ..explain import explain
from ..scan import own_score, scanner_settings
from .run import SweepSummary
from .store import SweepStore

HISTOGRAM_BINS = 60
REJECTS_SHOWN = 20
# Backgrounds of the significance levels 0..4 (Explanation.segments), faint to strong.
LEVEL_COLOURS = (None, "#fff3b0", "#ffd166", "#f8961e", "#f3722c")


def prepare_report_dir(folder: str | Path) -> Path:
    """Create the report folder and prove it writable now, before any model work."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise MemscanError(f"{folder}: report folder is not writable ({exc.strerror})") from exc
    return folder


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display: figures only ever become PNG bytes
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    _pyplot().close(fig)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def histogram_figure(store: SweepStore, summary: SweepSummary):
    """Scores of all prompts stored for this model and settings (grey) and of this sweep's new ones
    (orange, drawn over them), with the threshold; None before anything is stored."""
    import numpy as np
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    span = store.score_range("config", summary.config)
    if span is None:
        return None
    low, high = span
    if summary.threshold is not None:
        low, high = min(low, summary.threshold), max(high, summary.threshold)
    edges = np.linspace(low, high, HISTOGRAM_BINS + 1) if high > low else np.array([low - 0.5, high + 0.5])
    bins = len(edges) - 1
    fig, ax = _pyplot().subplots(figsize=(8, 3.5))
    stored = np.asarray(store.histogram("config", summary.config, edges[0], edges[-1], bins))
    new = np.asarray(store.histogram("sweep", summary.sweep, edges[0], edges[-1], bins))
    # Log counts: a handful of flagged prompts in the tail stays visible next to millions of normal
    # ones. The bars start at 0.5, under a count of 1 (a log axis has no 0).
    ax.bar(edges[:-1], np.where(stored > 0, stored - 0.5, 0), width=np.diff(edges), bottom=0.5, align="edge",
           color="#b8c4ce", label=f"all stored ({int(stored.sum())})")
    ax.bar(edges[:-1], np.where(new > 0, new - 0.5, 0), width=np.diff(edges), bottom=0.5, align="edge",
           color="#f8961e", edgecolor="#9c4f00", linewidth=0.6, alpha=0.9, label=f"new in this sweep ({int(new.sum())})")
    if summary.threshold is not None:
        ax.axvline(summary.threshold, color="crimson", ls="--", label=f"threshold {summary.threshold:.4g}")
    ax.set(xlabel="memorization score", ylabel="prompts (log scale)", yscale="log", title="score histogram")
    ax.set_ylim(0.5, max(2.0, float(stored.max()) * 2))
    # Plain counts at the powers of ten (1, 10, 100, ...), no "6x10^0" at the minor ticks.
    ax.yaxis.set_major_locator(LogLocator(base=10))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:,.0f}" if value >= 1 else ""))
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def _histogram_png(store: SweepStore, summary: SweepSummary) -> str | None:
    fig = histogram_figure(store, summary)
    return None if fig is None else _png(fig)


def _trend_png(history: list[dict]) -> str | None:
    """New prompts per past sweep (bars) and the flagged share of them (line)."""
    if not history:
        return None
    labels = [f"#{h['id']}\n{h['started'][:10]}" for h in history]
    fig, ax = _pyplot().subplots(figsize=(8, 3.5))
    bars = ax.bar(range(len(history)), [h["new"] for h in history], color="#8ecae6", label="new prompts")
    ax.set(ylabel="new prompts", title="past sweeps of this model and settings")
    ax.set_xticks(range(len(history)), labels, fontsize=7)
    share = ax.twinx()
    flagged = [h["flagged"] / h["new"] if h["flagged"] is not None and h["new"] else float("nan") for h in history]
    (line,) = share.plot(range(len(history)), flagged, color="crimson", marker="o", label="flagged share of new")
    share.set(ylabel="flagged share of new", ylim=(0, 1.05))
    ax.set_ylim(0, 1.3 * max(1, max(h["new"] for h in history)))  # headroom for the legend
    ax.legend(handles=[bars, line], loc="upper left", fontsize=8)
    fig.tight_layout()
    return _png(fig)


def _highlighted(explanation) -> str:
    out = []
    for text, share, level in explanation.segments():
        if level:
            out.append(f'<mark style="background:{LEVEL_COLOURS[level]}" title="{100 * share:.0f}%">{html.escape(text)}</mark>')
        else:
            out.append(html.escape(text))
    return "".join(out)


def _table(rows: list[dict], columns: list[str]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape('' if row[c] is None else str(row[c]))}</td>" for c in columns) + "</tr>" for row in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def _image(png: str | None, alt: str) -> str:
    return f'<img alt="{alt}" src="data:image/png;base64,{png}">' if png else f"<p>{alt}: no data yet.</p>"


STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 60em; color: #222; }
table { border-collapse: collapse; margin: .5em 0 1.5em; }
td, th { border: 1px solid #ccc; padding: .2em .6em; text-align: left; vertical-align: top; }
.prompt { font-size: 1.05em; } mark { border-radius: 3px; padding: 0 1px; }
.flagged { color: crimson; font-weight: bold; } code { word-break: break-all; }
"""


def write_report(
    store: SweepStore, summary: SweepSummary, scanner: Scanner, folder: Path, *, threshold_source: str | None, top: int = 10,
    detector: Detector | None = None,
) -> dict:
    """Write `sweep-ID-DATE.html`, `.json` and `.rejects.jsonl` into `folder`; returns the JSON summary.

    The top prompts are explained word by word for Wen's score only (`detector` None or wen): the word
    shares are those of Wen's score, which another detector's scores do not follow."""
    info = store.sweep_info(summary.sweep)
    stem = f"sweep-{summary.sweep}-{info['started'].replace(':', '').replace('-', '')}"
    paths = {kind: folder / f"{stem}.{kind}" for kind in ("html", "json", "rejects.jsonl")}
    candidates = store.top(summary.sweep, top)
    if summary.threshold is not None:
        candidates = [row for row in candidates if row["score"] >= summary.threshold]
    explanations = explain(scanner, [row["prompt"] for row in candidates]) if candidates and own_score(detector) else []
    if explanations:
        top_rows = [{**e.to_dict(summary.threshold), "source": row["source"]} for e, row in zip(explanations, candidates)]
    else:
        threshold = summary.threshold
        top_rows = [
            {**row, "threshold": threshold, "flagged": None if threshold is None else row["score"] >= threshold} for row in candidates
        ]
    history = store.history(summary.config)
    report = {
        "sweep": summary.sweep,
        "resumed": summary.resumed,
        "started": info["started"],
        "finished": info["finished"],
        "seconds": round(summary.seconds, 3),
        "model": {"source": scanner.model.source, "fingerprint": scanner.model.fingerprint},
        "settings": scanner_settings(scanner, detector),
        "threshold": summary.threshold,
        "threshold_source": threshold_source,
        "store": str(store.path),
        "inputs": json.loads(info["inputs"]),
        "counts": {k: getattr(summary, k) for k in ("rows", "new", "known", "rejected", "flagged")},
        "scored_by_this_run": summary.scored,
        "prompts_per_s": round(summary.prompts_per_s, 3),
        "rows_per_s": round(summary.rows_per_s, 3),
        "top": top_rows,
        "history": history,
        "files": {kind: path.name for kind, path in paths.items()},
    }
    with paths["rejects.jsonl"].open("w", encoding="utf-8") as f:
        shown = []
        for source, reason in store.rejects(summary.sweep):
            f.write(json.dumps({"id": source, "reason": reason}, ensure_ascii=False) + "\n")
            if len(shown) < REJECTS_SHOWN:
                shown.append({"id": source, "reason": reason})
    paths["json"].write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    paths["html"].write_text(
        _page(report, shown, history, _histogram_png(store, summary), _trend_png(history), explanations), encoding="utf-8"
    )
    return report


def _page(report: dict, rejects: list[dict], history: list[dict], histogram: str | None, trend: str | None, explanations) -> str:
    counts = report["counts"]
    flagged = "n/a (no threshold)" if counts["flagged"] is None else counts["flagged"]
    meta = [
        ("model", report["model"]["source"]),
        ("fingerprint", report["model"]["fingerprint"]),
        ("settings", json.dumps(report["settings"], sort_keys=True)),
        ("threshold", f"{report['threshold']} ({report['threshold_source'] or 'none'})"),
        ("store", report["store"]),
        ("inputs", ", ".join(report["inputs"])),
        ("started / finished (UTC)", f"{report['started']} / {report['finished']}" + (" (resumed)" if report["resumed"] else "")),
        ("duration", f"{report['seconds']:.1f} s"),
        ("rows", f"{counts['rows']}: {counts['new']} new, {counts['known']} already known, {counts['rejected']} rejected"),
        ("flagged (new)", flagged),
        ("throughput", f"{report['prompts_per_s']:.1f} prompts/s scored ({report['scored_by_this_run']} by this run), "
                       f"{report['rows_per_s']:.1f} rows/s swept"),
    ]
    meta_rows = "".join(f"<tr><th>{html.escape(k)}</th><td><code>{html.escape(str(v))}</code></td></tr>" for k, v in meta)
    title = "top flagged prompts" if report["threshold"] is not None else "top-scoring new prompts (no threshold: no verdict)"
    items = []
    for i, entry in enumerate(report["top"]):
        verdict = '<span class="flagged">FLAGGED</span> ' if entry["flagged"] else ""
        prompt = _highlighted(explanations[i]) if explanations else html.escape(entry["prompt"])
        items.append(
            f'<li>{verdict}score {entry["score"]:.4f} <small>({html.escape(entry["source"])})</small>'
            f'<div class="prompt">{prompt}</div></li>'
        )
    legend = (
        "Words highlighted by their leave-one-out significance (darker: larger share)." if explanations
        else "Words are not highlighted: their significance is measured on Wen's score, not this detector's."
    )
    top = f"<ol>{''.join(items)}</ol><p><small>{legend}</small></p>"
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>memscan sweep #{report['sweep']}</title><style>{STYLE}</style></head>
<body>
<h1>memscan sweep #{report['sweep']}, {html.escape(report['started'][:10])}</h1>
<table>{meta_rows}</table>
<h2>Scores</h2>
{_image(histogram, "score histogram")}
<h2>Trend</h2>
{_image(trend, "trend over past sweeps")}
{_table(history[-20:], ["id", "started", "rows", "new", "known", "rejected", "flagged", "threshold"])}
<h2>{title}</h2>
{top if items else "<p>None.</p>"}
<h2>Rejected ({counts['rejected']})</h2>
{_table(rejects, ["id", "reason"]) if rejects else "<p>None.</p>"}
<p><small>All rejects: {html.escape(report['files']['rejects.jsonl'])}. Summary: {html.escape(report['files']['json'])}.</small></p>
</body></html>
"""
