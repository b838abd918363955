"""The drift report as HTML: a section (also for the run report) and a whole page.

Self-contained: charts are PNGs drawn with matplotlib and embedded as data URIs, styles
are inline, nothing is fetched from the network.
"""

from __future__ import annotations

import base64
import html
import io

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

REFERENCE_COLOR, CURRENT_COLOR = "#4c72b0", "#dd8452"


def data_uri(png: bytes) -> str:
    """A PNG as an ``src`` that needs no request."""
    return "data:image/png;base64," + base64.b64encode(png).decode()


def png_bytes(figure) -> bytes:
    """A matplotlib figure as PNG; the figure is closed."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=96, bbox_inches="tight")
    plt.close(figure)
    return buffer.getvalue()


def png_data_uri(figure) -> str:
    """A matplotlib figure as an embeddable PNG; the figure is closed."""
    return data_uri(png_bytes(figure))


def _bin_labels(edges: list[float]) -> list[str]:
    if not edges:
        return ["all"]
    labels = [f"≤{edges[0]:.3g}"]
    labels += [f"{low:.3g}–{high:.3g}" for low, high in zip(edges, edges[1:], strict=False)]
    return [*labels, f">{edges[-1]:.3g}"]


def shares_chart(name: str, result: dict) -> str:
    """Reference and current shares of one value's bins or categories, side by side."""
    if result["kind"] == "numeric":
        labels = _bin_labels(result["bins"]["edges"])
        reference, current = result["bins"]["reference"], result["bins"]["current"]
    else:
        labels, reference, current = result["categories"], result["reference"], result["current"]
    figure, axes = plt.subplots(figsize=(max(3.0, 0.45 * len(labels) + 1.5), 2.4))
    positions = range(len(labels))
    axes.bar([p - 0.2 for p in positions], reference, 0.4, label="reference", color=REFERENCE_COLOR)
    axes.bar([p + 0.2 for p in positions], current, 0.4, label="served", color=CURRENT_COLOR)
    axes.set_xticks(list(positions), labels, rotation=45, ha="right", fontsize=7)
    axes.set_ylabel("share", fontsize=8)
    axes.set_title(f"{name}: PSI {result['psi']:.3f}", fontsize=9)
    axes.legend(fontsize=7)
    return png_data_uri(figure)


def drift_section(report: dict) -> str:
    """The drift verdict, a row per tested value, and a chart of each."""
    status = {"drift": "DRIFT", "ok": "no drift", "insufficient_traffic": "too little traffic"}
    rows, charts = [], []
    for name, result in report["values"].items():
        flag = "drifted" if result["drifted"] else ""
        rows.append(
            f"<tr class='{flag}'><td>{html.escape(name)}</td><td>{result['test']}</td>"
            f"<td>{result['statistic']:.4g}</td><td>{result['p_value']:.3g}</td>"
            f"<td>{result['psi']:.4f}</td><td>{'yes' if result['drifted'] else 'no'}</td></tr>"
        )
        charts.append(f"<img alt='{html.escape(name)}' src='{shares_chart(name, result)}'>")
    settings = report["settings"]
    return (
        "<section class='drift'>"
        f"<h2>Drift: {status[report['status']]}</h2>"
        f"<p>{html.escape(report['model'])}, checked {report['checked_at']}: "
        f"{report['rows']} served rows against {report['reference_rows']} reference rows. "
        f"A value drifts when its PSI is at least {settings['psi_threshold']} and its "
        f"test's p-value is below {report.get('alpha_per_value', settings['p_value']):.3g}.</p>"
        "<table><tr><th>value</th><th>test</th><th>statistic</th><th>p-value</th>"
        f"<th>PSI</th><th>drifted</th></tr>{''.join(rows)}</table>"
        f"<div class='charts'>{''.join(charts)}</div>"
        "</section>"
    )


STYLE = (
    "body{font-family:sans-serif;margin:2em;color:#222}"
    "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 8px}"
    "tr.drifted{background:#fde0dc}.charts img{margin:6px}"
    ".warning{background:#fde0dc;border-left:4px solid #c0392b;padding:6px 10px}"
)


def drift_page(report: dict) -> str:
    """A whole HTML page holding the drift section."""
    title = html.escape(f"forgeml drift report: {report['model']}")
    return (
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{title}</title>"
        f"<style>{STYLE}</style></head><body>{drift_section(report)}</body></html>"
    )
