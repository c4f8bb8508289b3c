"""`editstream report RUN_DIR`: PNG plots and a one-page HTML summary of a run's Arrow logs."""

from __future__ import annotations

import html
import logging
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from editstream.arrowlog import read_log  # noqa: E402
from editstream.monitoring import alarms, by_version, retention_by_age, run_info, throughput  # noqa: E402

log = logging.getLogger(__name__)


def _title(info: dict, what: str) -> str:
    return f"{what}\n{info.get('method', '?')} on {info.get('model', '?')}"


def forgetting_curve(evals, info: dict, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for kind, style in (("reliability", "o-"), ("generality", "s--")):
        pts = retention_by_age(evals, kind)
        if pts:
            ax.plot(
                [max(p["lo"], 0.5) for p in pts],
                [p["score"] for p in pts],
                style,
                label=f"{kind} (prompt)" if kind == "reliability" else f"{kind} (paraphrase)",
            )
    ax.set_xscale("log")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("edit age (edits applied since; log scale, 0 plotted at 0.5)")
    ax.set_ylabel("teacher-forced token accuracy")
    ax.set_title(_title(info, "Forgetting curve: retention of earlier edits by age"))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def locality_plot(evals, info: dict, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for kind, style in (("locality", "o-"), ("reliability", "^:")):
        pts = by_version(evals, kind)
        if pts:
            ax.plot([p["edits"] for p in pts], [p["score"] for p in pts], style, label=kind)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("edits applied (replica version)")
    ax.set_ylabel("agreement with unedited model / accuracy")
    ax.set_title(_title(info, "Locality and reliability vs number of edits"))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def throughput_plot(edits, info: dict, path: Path) -> None:
    pts = throughput(edits)
    fig, ax = plt.subplots(figsize=(7, 4.2))
    ax.bar(
        [p["t_s"] for p in pts],
        [p["edits_per_s"] for p in pts],
        width=0.9,
        color="tab:blue",
        alpha=0.6,
        label="edits applied per second",
    )
    ax.set_xlabel("time since first applied edit (s)")
    ax.set_ylabel("edits / s", color="tab:blue")
    ax2 = ax.twinx()
    ax2.plot([p["t_s"] for p in pts], [p["latency_ms"] for p in pts], "r.-", label="mean edit latency")
    ax2.set_ylabel("XADD -> applied latency (ms)", color="tab:red")
    ax.set_title(_title(info, "Edit throughput and latency over time"))
    lines = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
    ax.legend(lines, [ln.get_label() for ln in lines], loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(run_dir: Path, out: Path | None = None) -> Path:
    """Write forgetting.png, locality.png, throughput.png and index.html; returns the HTML path."""
    run_dir = Path(run_dir)
    out = Path(out or run_dir / "report")
    out.mkdir(parents=True, exist_ok=True)
    info = run_info(run_dir)
    evals, edits = read_log(run_dir, "eval"), read_log(run_dir, "edits")
    forgetting_curve(evals, info, out / "forgetting.png")
    locality_plot(evals, info, out / "locality.png")
    throughput_plot(edits, info, out / "throughput.png")
    retention = retention_by_age(evals)
    alarm_list = alarms(evals)
    rows = "".join(f"<tr><td>{r['age']}</td><td>{r['n']}</td><td>{r['score']:.3f}</td></tr>" for r in retention)
    title = html.escape(str(run_dir))
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>editstream run {title}</title>
<style>body{{font-family:sans-serif;max-width:1000px;margin:2em auto}} td,th{{padding:2px 10px}}</style></head><body>
<h1>editstream run: {html.escape(info.get("method", "?"))} on {html.escape(info.get("model", "?"))}</h1>
<p>{evals.num_rows} evaluation records, {edits.num_rows} edit events. Run directory: {html.escape(str(run_dir))}</p>
<p><b>Alarms:</b> {html.escape("; ".join(alarm_list) or "none")}</p>
<img src="forgetting.png"><img src="locality.png"><img src="throughput.png">
<h2>Retention (reliability) by edit age</h2>
<table><tr><th>age (edits)</th><th>probes</th><th>score</th></tr>{rows}</table>
</body></html>"""
    path = out / "index.html"
    path.write_text(page)
    log.info("report written to %s", path)
    return path
