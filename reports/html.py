"""Render a selection report (the dict from :func:`curate.reports.summary.build_report`) as one
self-contained HTML page: inline CSS and inline SVG only, no scripts, no external URLs.

Every string that comes from the data or the caller (domains, languages, shard names, meta values,
problem messages) passes through :func:`esc`; domains and captions are hostile web data. A
Content-Security-Policy meta tag that forbids scripts and remote loads is a second line of defence.
"""

from __future__ import annotations

import html
import json
from typing import Any

SHARDS_OPEN_MAX = 12  # more shards than this: the shard table goes into a closed <details>
BAR_W = 120
BAR_H = 12

CSS = """
:root { color-scheme: light; }
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif;
       margin: 1.5rem auto; max-width: 76rem; padding: 0 1rem; color: #1b1f24; line-height: 1.4; }
h1 { font-size: 1.5rem; margin-bottom: .25rem; }
h2 { font-size: 1.15rem; margin-top: 2rem; border-bottom: 1px solid #d0d7de; padding-bottom: .2rem; }
h3 { font-size: 1rem; margin: 1.25rem 0 .4rem; }
.sub { color: #57606a; margin-top: 0; }
.cards { display: flex; flex-wrap: wrap; gap: .75rem; margin: 1rem 0; }
.card { border: 1px solid #d0d7de; border-radius: 6px; padding: .5rem .9rem; min-width: 9rem; }
.card .k { color: #57606a; font-size: .8rem; text-transform: uppercase; letter-spacing: .03em; }
.card .v { font-size: 1.35rem; font-variant-numeric: tabular-nums; font-weight: 600; }
.ok { background: #dafbe1; border-color: #4ac26b; color: #116329; }
.bad { background: #ffebe9; border: 2px solid #cf222e; color: #82071e; }
.alarm { background: #cf222e; color: #fff; padding: .75rem 1rem; border-radius: 6px; font-weight: 700;
         font-size: 1.1rem; margin: 1rem 0; }
.alarm ul { font-weight: 400; font-size: .95rem; margin: .4rem 0 0; }
table { border-collapse: collapse; margin: .3rem 0 1rem; font-size: .9rem; }
th, td { padding: .22rem .6rem; border-bottom: 1px solid #eaeef2; vertical-align: top; }
th { text-align: left; background: #f6f8fa; font-weight: 600; }
td.n, th.n { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
td.val { max-width: 26rem; overflow-wrap: anywhere; font-family: ui-monospace, SFMono-Regular, Menlo, monospace; }
tr.small td { color: #8c959f; }
tr.other td { font-style: italic; background: #fbfbfc; }
tr.broken td { background: #ffebe9; }
.tag { display: inline-block; font-size: .75rem; padding: 0 .35rem; border-radius: 4px;
       background: #eaeef2; color: #57606a; white-space: nowrap; }
.tag.hi { background: #ffebe9; color: #82071e; }
.tag.lo { background: #ddf4ff; color: #0a3069; }
.help { color: #57606a; }
dl.meta { display: grid; grid-template-columns: max-content 1fr; gap: .15rem 1rem; font-size: .9rem; }
dl.meta dt { color: #57606a; }
dl.meta dd { margin: 0; overflow-wrap: anywhere; font-family: ui-monospace, SFMono-Regular, Menlo, monospace; }
details summary { cursor: pointer; margin: .3rem 0; }
.note { color: #57606a; font-size: .85rem; }
svg text { font-family: inherit; font-size: 11px; fill: #57606a; }
"""


# --------------------------------------------------------------------------------------------------
# formatting


def esc(x: Any) -> str:
    """Escape anything for HTML text and attribute values."""
    return html.escape("" if x is None else str(x), quote=True)


def fmt_int(n: Any) -> str:
    return "—" if n is None else f"{int(n):,}"


def fmt_pct(x: Any) -> str:
    return "—" if x is None else f"{100.0 * float(x):.1f}%"


def fmt_ratio(x: Any) -> str:
    return "—" if x is None else f"{float(x):.2f}×"


def fmt_num(x: Any, digits: int = 3) -> str:
    return "—" if x is None else f"{float(x):.{digits}f}"


def _td(x: str, cls: str = "n") -> str:
    return f'<td class="{cls}">{x}</td>' if cls else f"<td>{x}</td>"


# --------------------------------------------------------------------------------------------------
# inline SVG


def rate_bar(rate: float | None, ci: list[float] | None, overall: float | None) -> str:
    """A small horizontal bar: the removal rate, its CI as a whisker, the overall rate as a tick."""
    if rate is None:
        return ""
    w, h = BAR_W, BAR_H
    parts = [f'<svg width="{w}" height="{h}" viewBox="0 0 {w} {h}" role="img" aria-label="removal rate {fmt_pct(rate)}">']
    parts.append(f'<rect x="0" y="0" width="{w}" height="{h}" fill="#f6f8fa"/>')
    parts.append(f'<rect x="0" y="2" width="{rate * w:.1f}" height="{h - 4}" fill="#d4a72c"/>')
    if ci:
        lo, hi = ci[0] * w, ci[1] * w
        parts.append(f'<line x1="{lo:.1f}" x2="{hi:.1f}" y1="{h / 2}" y2="{h / 2}" stroke="#1b1f24" stroke-width="1"/>')
    if overall is not None:
        x = overall * w
        parts.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="0" y2="{h}" stroke="#cf222e" stroke-width="1.5"/>')
    parts.append("</svg>")
    return "".join(parts)


def histogram_svg(edges: list[float], counts: list[int], quantiles: dict[str, Any] | None = None) -> str:
    if not counts:
        return '<p class="note">No CLIP scores.</p>'
    W, H, pad_l, pad_b, pad_t = 640, 200, 56, 28, 10
    pw, ph = W - pad_l - 10, H - pad_b - pad_t
    top = max(counts) or 1
    n = len(counts)
    bw = pw / n
    lo, hi = edges[0], edges[-1]
    span = (hi - lo) or 1.0
    out = [f'<svg width="{W}" height="{H}" viewBox="0 0 {W} {H}" role="img" aria-label="histogram of CLIP scores">']
    for i, c in enumerate(counts):
        bh = ph * c / top
        x = pad_l + i * bw
        out.append(
            f'<rect x="{x + 1:.1f}" y="{pad_t + ph - bh:.1f}" width="{max(bw - 2, 1):.1f}" height="{bh:.1f}" fill="#54aeff">'
            f"<title>{esc(fmt_num(edges[i]))} – {esc(fmt_num(edges[i + 1]))}: {esc(fmt_int(c))}</title></rect>"
        )
    # axes
    out.append(f'<line x1="{pad_l}" x2="{pad_l + pw}" y1="{pad_t + ph}" y2="{pad_t + ph}" stroke="#8c959f"/>')
    out.append(f'<line x1="{pad_l}" x2="{pad_l}" y1="{pad_t}" y2="{pad_t + ph}" stroke="#8c959f"/>')
    out.append(f'<text x="{pad_l - 4}" y="{pad_t + 8}" text-anchor="end">{esc(fmt_int(top))}</text>')
    out.append(f'<text x="{pad_l - 4}" y="{pad_t + ph}" text-anchor="end">0</text>')
    for frac in (0.0, 0.25, 0.5, 0.75, 1.0):
        x = pad_l + frac * pw
        out.append(f'<text x="{x:.1f}" y="{H - 8}" text-anchor="middle">{esc(fmt_num(lo + frac * span))}</text>')
    # median marker
    p50 = (quantiles or {}).get("p50")
    if p50 is not None:
        x = pad_l + (p50 - lo) / span * pw
        out.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{pad_t}" y2="{pad_t + ph}" stroke="#cf222e" stroke-dasharray="3,3"/>')
        out.append(f'<text x="{x + 3:.1f}" y="{pad_t + 10}">median</text>')
    out.append("</svg>")
    return "".join(out)


# --------------------------------------------------------------------------------------------------
# sections


def _headline(rep: dict[str, Any]) -> str:
    t = rep.get("totals", {})
    ok = bool(rep.get("reconciles"))
    cards = [
        ("Rows in", fmt_int(t.get("rows_in")), ""),
        ("Kept", fmt_int(t.get("kept")), ""),
        ("Removed", fmt_int(t.get("removed")), ""),
        ("Removal rate", fmt_pct(t.get("removal_rate")), ""),
        ("Counts", "reconcile" if ok else "DO NOT RECONCILE", "ok" if ok else "bad"),
    ]
    out = ['<div class="cards">']
    for k, v, cls in cards:
        out.append(f'<div class="card {cls}"><div class="k">{esc(k)}</div><div class="v">{esc(v)}</div></div>')
    out.append("</div>")
    if not ok:
        out.append('<div class="alarm">Counts do not reconcile: this report (or the selection) is wrong somewhere.<ul>')
        for p in rep.get("problems") or ["(no detail recorded)"]:
            out.append(f"<li>{esc(p)}</li>")
        out.append("</ul></div>")
    return "\n".join(out)


def _meta(rep: dict[str, Any]) -> str:
    meta = rep.get("meta") or {}
    settings = rep.get("settings") or {}
    if not meta and not settings:
        return ""
    out = ['<h2>Run</h2><dl class="meta">']
    for k, v in list(meta.items()) + [(f"report.{k}", v) for k, v in settings.items()]:
        if isinstance(v, (dict, list, tuple)):
            v = json.dumps(v, sort_keys=True, default=str)
        out.append(f"<dt>{esc(k)}</dt><dd>{esc(v)}</dd>")
    out.append("</dl>")
    return "\n".join(out)


def _reasons(rep: dict[str, Any]) -> str:
    rows = rep.get("reasons") or []
    out = [
        "<h2>Why rows were removed</h2>",
        '<p class="note">Rules are checked in this order; a row is counted once, under the first rule it '
        "fails (“first reason”). “Failed (any)” counts every row that fails the rule, including rows "
        "already removed by an earlier one.</p>",
        '<table><thead><tr><th>Reason</th><th class="n">Removed (first reason)</th><th class="n">% of input</th>'
        '<th class="n">% of removed</th><th class="n">Failed (any)</th><th class="n">% of input</th><th></th>'
        "<th>What it means</th></tr></thead><tbody>",
    ]
    for r in rows:
        bar = rate_bar(r.get("removed_first_share") or 0.0, None, None)
        out.append(
            "<tr>"
            + _td(esc(r.get("reason")), "val")
            + _td(esc(fmt_int(r.get("removed_first"))))
            + _td(esc(fmt_pct(r.get("removed_first_share"))))
            + _td(esc(fmt_pct(r.get("share_of_removed"))))
            + _td(esc(fmt_int(r.get("failed_any"))))
            + _td(esc(fmt_pct(r.get("failed_any_share"))))
            + _td(bar, "")
            + _td(esc(r.get("help")), "help")
            + "</tr>"
        )
    an = rep.get("anomalies") or {}
    extra = []
    if an.get("removed_without_reason"):
        extra.append(("(removed, no reason)", an["removed_without_reason"]))
    for k, v in (an.get("removed_unknown_reason") or {}).items():
        extra.append((f"(unknown reason) {k}", v))
    for name, n in extra:
        out.append(f'<tr class="broken">{_td(esc(name), "val")}{_td(esc(fmt_int(n)))}<td colspan="6"></td></tr>')
    out.append("</tbody></table>")
    return "\n".join(out)


def _shards(rep: dict[str, Any]) -> str:
    shards = rep.get("shards") or []
    bad = [s for s in shards if not s.get("reconciles")]
    body = [
        '<table><thead><tr><th>Shard</th><th class="n">Rows in</th><th class="n">Kept</th><th class="n">Removed</th>'
        '<th class="n">Removal rate</th><th>Reconciles</th></tr></thead><tbody>'
    ]
    for s in shards:
        cls = "" if s.get("reconciles") else ' class="broken"'
        body.append(
            f"<tr{cls}>"
            + _td(esc(s.get("shard")), "val")
            + _td(esc(fmt_int(s.get("rows_in"))))
            + _td(esc(fmt_int(s.get("kept"))))
            + _td(esc(fmt_int(s.get("removed"))))
            + _td(esc(fmt_pct(s.get("removal_rate"))))
            + _td("yes" if s.get("reconciles") else "<strong>NO</strong>", "")
            + "</tr>"
        )
    body.append("</tbody></table>")
    table = "\n".join(body)
    head = f"<h2>Shards ({esc(fmt_int(len(shards)))})</h2>"
    if bad:
        head += f'<p class="bad" style="padding:.3rem .6rem">{esc(fmt_int(len(bad)))} shard(s) do not reconcile.</p>'
    if len(shards) > SHARDS_OPEN_MAX:
        opened = " open" if bad else ""
        return f"{head}<details{opened}><summary>Show all {esc(fmt_int(len(shards)))} shards</summary>{table}</details>"
    return head + table


def _group(name: str, sec: dict[str, Any], overall: float | None) -> str:
    rows = sec.get("rows") or []
    distinct = sec.get("distinct", len(rows))
    shown = sec.get("shown", len(rows))
    more = f", largest {esc(fmt_int(shown))} shown, the rest rolled up" if distinct > shown else ""
    out = [f'<h3>By {esc(name)} <span class="note">({esc(fmt_int(distinct))} distinct{more})</span></h3>']
    if not sec.get("reconciles", True):
        out.append(f'<p class="bad" style="padding:.3rem .6rem">Grouping by {esc(name)} does not reconcile.</p>')
    out.append(
        f'<table><thead><tr><th>{esc(name)}</th><th class="n">Rows in</th><th class="n">Kept</th><th class="n">Removed</th>'
        '<th class="n">Removal rate</th><th class="n">95% CI</th><th class="n">vs overall</th><th></th>'
        "<th>Top reason</th><th></th></tr></thead><tbody>"
    )
    for g in rows:
        classes = []
        if g.get("too_small"):
            classes.append("small")
        if g.get("other_groups"):
            classes.append("other")
        if not g.get("reconciles", True):
            classes.append("broken")
        cls = f' class="{" ".join(classes)}"' if classes else ""
        ci = g.get("ci95")
        ci_txt = f"{fmt_pct(ci[0])} – {fmt_pct(ci[1])}" if ci else "—"
        by = g.get("removed_by_reason") or {}
        top = max(by.items(), key=lambda kv: kv[1], default=(None, 0))
        top_txt = f"{top[0]} ({fmt_int(top[1])})" if top[1] else ""
        flag = ""
        if g.get("too_small"):
            flag = '<span class="tag">too small to judge</span>'
        elif ci and overall is not None and not g.get("other_groups"):
            if ci[0] > overall:
                flag = '<span class="tag hi">removed more than overall</span>'
            elif ci[1] < overall:
                flag = '<span class="tag lo">removed less than overall</span>'
        value = g.get("value")
        value_html = f"<em>{esc(value)}</em>" if g.get("unknown") or g.get("other_groups") else esc(value)
        out.append(
            f"<tr{cls}>"
            + _td(value_html, "val")
            + _td(esc(fmt_int(g.get("rows_in"))))
            + _td(esc(fmt_int(g.get("kept"))))
            + _td(esc(fmt_int(g.get("removed"))))
            + _td(esc(fmt_pct(g.get("removal_rate"))))
            + _td(esc(ci_txt))
            + _td(esc(fmt_ratio(g.get("ratio_to_overall"))))
            + _td(rate_bar(g.get("removal_rate"), ci, overall), "")
            + _td(esc(top_txt), "")
            + _td(flag, "")
            + "</tr>"
        )
    out.append("</tbody></table>")
    return "\n".join(out)


def _groups(rep: dict[str, Any]) -> str:
    groups = rep.get("groups") or {}
    if not groups:
        return ""
    overall = (rep.get("totals") or {}).get("removal_rate")
    settings = rep.get("settings") or {}
    out = [
        "<h2>Who is removed: removal rate by group</h2>",
        '<p class="note">Bar: removal rate; black whisker: its 95% Wilson interval; red tick: the overall rate '
        f"({esc(fmt_pct(overall))}). “vs overall” is the group's rate divided by the overall rate. Groups with "
        f"fewer than {esc(fmt_int(settings.get('min_group_size')))} rows are greyed out as too small to judge. "
        "A group is flagged only when its whole interval lies above or below the overall rate.</p>",
    ]
    for name, sec in groups.items():
        out.append(_group(name, sec, overall))
    return "\n".join(out)


def _clip(rep: dict[str, Any]) -> str:
    c = rep.get("clip_score")
    if not c:
        return "<h2>CLIP scores</h2><p class=\"note\">No clip_score column.</p>"
    h = c.get("histogram") or {}
    q = c.get("quantiles") or {}
    qrow = "".join(f'<th class="n">{esc(k)}</th>' for k in q)
    qval = "".join(_td(esc(fmt_num(v))) for v in q.values())
    return "\n".join(
        [
            "<h2>CLIP scores</h2>",
            f'<p class="note">{esc(fmt_int(c.get("scored")))} rows scored, {esc(fmt_int(c.get("null")))} without a score; '
            f"mean {esc(fmt_num(c.get('mean')))}, range {esc(fmt_num(c.get('min')))} – {esc(fmt_num(c.get('max')))}.</p>",
            histogram_svg(h.get("edges") or [], h.get("counts") or [], q),
            f"<table><thead><tr>{qrow}</tr></thead><tbody><tr>{qval}</tr></tbody></table>",
        ]
    )


def _fetch(rep: dict[str, Any]) -> str:
    f = rep.get("fetch_status")
    if not f:
        return ""
    total = sum(f.values()) or 1
    out = [
        "<h2>Fetch status</h2>",
        '<table><thead><tr><th>Status</th><th class="n">Rows</th><th class="n">% of input</th></tr></thead><tbody>',
    ]
    for k, v in f.items():
        out.append(f"<tr>{_td(esc(k), 'val')}{_td(esc(fmt_int(v)))}{_td(esc(fmt_pct(v / total)))}</tr>")
    out.append("</tbody></table>")
    return "\n".join(out)


def render_html(report: dict[str, Any]) -> str:
    """The whole report as one self-contained HTML page (a str)."""
    meta = report.get("meta") or {}
    name = meta.get("selection") or meta.get("selection_name") or meta.get("name") or "selection"
    sub = " · ".join(esc(meta[k]) for k in ("model", "created_at", "run_dir") if meta.get(k))
    title = f"Selection report: {name}"
    body = [
        f"<h1>{esc(title)}</h1>",
        f'<p class="sub">{sub}</p>' if sub else "",
        _headline(report),
        _reasons(report),
        _groups(report),
        _clip(report),
        _fetch(report),
        _shards(report),
        _meta(report),
    ]
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\n"
        "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; style-src 'unsafe-inline'; img-src data:\">\n"
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{esc(title)}</title>\n<style>{CSS}</style></head>\n<body>\n"
        + "\n".join(p for p in body if p)
        + "\n</body></html>\n"
    )


__all__ = ["render_html", "esc"]
