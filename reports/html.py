"""Render a selection report (the dict from :func:`curate.reports.summary.build_report`) as one
self-contained HTML page: inline CSS and inline SVG only, no scripts, no external URLs.

Every string that comes from the data or the caller (domains, languages, shard names, meta values,
problem messages) passes through :func:`esc`; domains and captions are hostile web data. A
Content-Security-Policy meta tag that forbids scripts and remote loads is a second line of defence.
"""

from __future__ import annotations

import html
import json
import re
from typing import Any

SHARDS_OPEN_MAX = 12  # more shards than this: the shard table goes into a closed <details>
# a name cell (class "val": CSS max-width 16rem, monospace, ~29 columns) always shows 12 characters,
# even wide (CJK) ones; a longer name may be ellipsised, so it gets its full value as a title (tooltip)
NAME_FITS_CHARS = 12
BAR_W = 120
BAR_H = 12

CSS = """
:root { color-scheme: light; }
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif;
       margin: 1.5rem auto; max-width: 80rem; padding: 0 1rem; color: #1b1f24; line-height: 1.4; }
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
/* a table wider than the page scrolls inside itself (display: block), never the page */
table { display: block; max-width: 100%; overflow-x: auto; width: max-content; }
th, td { padding: .22rem .45rem; border-bottom: 1px solid #eaeef2; vertical-align: top; }
th { text-align: left; background: #f6f8fa; font-weight: 600; }
td.n, th.n { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
th.n { white-space: normal; }
/* names (domains, group values, shards) stay on one line, never broken mid-word: one too long for
   16rem is ellipsised, and its full value is the cell's title (a tooltip) */
td.val { max-width: 16rem; white-space: nowrap; overflow: hidden; text-overflow: ellipsis;
         font-family: ui-monospace, SFMono-Regular, Menlo, monospace; }
td.val .tag { max-width: 100%; overflow: hidden; text-overflow: ellipsis; vertical-align: bottom; }
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
.gal { display: flex; flex-wrap: wrap; gap: .5rem; margin: .2rem 0 .6rem; }
.gcard { width: 9.5rem; border: 1px solid #d0d7de; border-radius: 6px; padding: .3rem; font-size: .78rem; }
.gcard img, .gcard .noimg { width: 112px; height: 112px; object-fit: contain; display: block; margin: 0 auto .2rem;
       background: #f6f8fa; }
.gcard .noimg { line-height: 112px; text-align: center; color: #8c959f; }
.gcard .cap { max-height: 4.2em; overflow: hidden; overflow-wrap: anywhere; }
.gcard.above { border-color: #4ac26b; } .gcard.below { border-color: #cf222e; }
.side { font-size: .8rem; color: #57606a; margin: .2rem 0; }
td.hot { background: #ffebe9; font-weight: 600; }
.legend span { display: inline-block; margin-right: .8rem; font-size: .8rem; }
.legend i { display: inline-block; width: .8rem; height: .25rem; vertical-align: middle; margin-right: .25rem; }
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
    """A cell holding the HTML `x`. A name cell (cls "val") longer than NAME_FITS_CHARS may be
    ellipsised (CSS), so its text, tags removed, is also its title."""
    if cls == "val":
        text = html.unescape(re.sub(r"<[^>]*>", "", x))  # x: our tags around escaped data (no raw "<")
        if len(text) > NAME_FITS_CHARS:
            return f'<td class="val" title="{esc(text)}">{x}</td>'
    return f'<td class="{cls}">{x}</td>' if cls else f"<td>{x}</td>"


# --------------------------------------------------------------------------------------------------
# inline SVG


def rate_bar(rate: float | None, ci: list[float] | None, overall: float | None) -> str:
    """A small horizontal bar: the removal rate, its CI as a whisker, the overall rate as a tick."""
    if rate is None:
        return ""
    w, h = BAR_W, BAR_H
    parts = [
        f'<svg width="{w}" height="{h}" viewBox="0 0 {w} {h}" role="img" aria-label="removal rate {fmt_pct(rate)}">'
    ]
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
        out.append(
            f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{pad_t}" y2="{pad_t + ph}" stroke="#cf222e" stroke-dasharray="3,3"/>'
        )
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
    if t.get("forgotten"):  # rows deleted on request (curate forget): rows read = rows in + forgotten
        cards.insert(1, ("Forgotten (deletion requests)", fmt_int(t.get("forgotten")), ""))
    # the disparities' lead view: net of the policy that targets a grouping by design (_lead)
    views = [_lead(n, sec)[1] for n, sec in (rep.get("groups") or {}).items()]
    flagged = sum((sec.get("flagged_groups") or 0) for sec in views)
    if rep.get("groups"):
        net = any((sec.get("policy") or {}).get("net") for sec in (rep.get("groups") or {}).values())
        label = "Groups flagged (net of policy)" if net else "Groups flagged"
        cards.append((label, fmt_int(flagged), "bad" if flagged else ""))
    if rep.get("clip_threshold") is not None:
        cards.append(("CLIP threshold", fmt_num(rep.get("clip_threshold")), ""))
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


def _failed_shards(rep: dict[str, Any]) -> str:
    """Shards the run could not process: their rows are in no count of this report."""
    meta = rep.get("meta") or {}
    failed = meta.get("failed_shards") or {}
    if not failed:
        return ""
    rows = meta.get("unaccounted_rows") or {}
    known = [v for v in rows.values() if isinstance(v, int)]
    total = fmt_int(sum(known)) + ("" if len(known) == len(failed) else " + unknown")
    out = [
        f'<div class="alarm">{esc(fmt_int(len(failed)))} input shard(s) failed: {esc(total)} rows are not accounted for '
        "in this report (neither kept nor removed). Fix the shards and rerun `curate run`.</div>",
        '<table><thead><tr><th>Failed shard</th><th class="n">Rows unaccounted</th><th>Error</th></tr></thead><tbody>',
    ]
    for shard, err in sorted(failed.items()):
        n = rows.get(shard, "unknown")
        out.append(
            f"<tr>{_td(esc(shard), 'val')}{_td(esc(fmt_int(n) if isinstance(n, int) else n))}{_td(esc(err), '')}</tr>"
        )
    out.append("</tbody></table>")
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


def _concepts(rep: dict[str, Any]) -> str:
    """The concept policy (selection.concepts, curate/concepts.py): each concept's prompts, scoring,
    rule and resolved threshold, the model whose embeddings were scored, and what it tagged."""
    pol = (rep.get("meta") or {}).get("concepts")
    if not pol:
        return ""
    counts = {r.get("reason"): r for r in rep.get("reasons") or []}
    out = [
        "<h2>Concepts: tags from image embeddings</h2>",
        f'<p class="note">Each stored image embedding is scored against the prompts of the text tower of '
        f"<code>{esc(pol.get('model_id'))}</code> (logit scale {esc(fmt_num(pol.get('logit_scale')))}): the highest "
        "cosine over the prompts, or, with negatives, the softmax probability mass on the prompts. A row whose score "
        "reaches the threshold is tagged and removed with reason concept:&lt;name&gt;.</p>",
        "<table><thead><tr><th>Concept</th><th>Prompts</th><th>Negatives</th><th>Score</th><th>Rule</th>"
        '<th class="n">Threshold</th><th class="n">Tagged</th><th class="n">Removed (first reason)</th>'
        "</tr></thead><tbody>",
    ]
    for name, c in (pol.get("concepts") or {}).items():
        rule = (
            f"score ≥ {fmt_num(c.get('min_similarity'))}"
            if c.get("min_similarity") is not None
            else f"top {fmt_pct(c.get('top_fraction'))}"
        )
        n = counts.get(c.get("reason")) or {}
        out.append(
            "<tr>"
            + _td(esc(name), "val")
            + _td(esc("; ".join(c.get("prompts") or [])), "help")
            + _td(esc("; ".join(c.get("negatives") or [])), "help")
            + _td(esc(c.get("scoring")), "val")
            + _td(esc(rule), "val")
            + _td(esc(fmt_num(c.get("threshold"), 4)))
            + _td(esc(fmt_int(n.get("failed_any"))))
            + _td(esc(fmt_int(n.get("removed_first"))))
            + "</tr>"
        )
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
    more = (
        f"; {esc(fmt_int(shown))} shown: the largest, and flagged ones beyond them; the other "
        f"{esc(fmt_int(distinct - shown))} summed in the last row"
        if distinct > shown
        else ""
    )
    out = [f'<h3>By {esc(name)} <span class="note">({esc(fmt_int(distinct))} distinct{more})</span></h3>']
    if not sec.get("reconciles", True):
        out.append(f'<p class="bad" style="padding:.3rem .6rem">Grouping by {esc(name)} does not reconcile.</p>')
    out.append(
        f'<table><thead><tr><th>{esc(name)}</th><th>Flag</th><th class="n">Rows in</th><th class="n">Kept</th>'
        '<th class="n">Removed</th><th class="n">Removal rate</th><th class="n">95% CI</th><th class="n">Rest of rows</th>'
        '<th class="n">vs overall</th><th class="n">q (BH)</th><th></th><th>Top reason</th></tr></thead><tbody>'
    )
    for g in sorted(rows, key=_sig_key):
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
        if g.get("other_groups"):
            flag = ""
        elif g.get("too_small"):
            flag = '<span class="tag">too small to judge</span>'
        elif g.get("significant"):
            flag = (
                '<span class="tag hi">removed MORE than the rest</span>'
                if g.get("direction") == "higher"
                else '<span class="tag lo">removed LESS than the rest</span>'
            )
        value = g.get("value")
        value_html = f"<em>{esc(value)}</em>" if g.get("unknown") or g.get("other_groups") else esc(value)
        out.append(
            f"<tr{cls}>"
            + _td(value_html, "val")
            + _td(flag, "")  # second: in view even when the table scrolls (docs/REPORTS.md)
            + _td(esc(fmt_int(g.get("rows_in"))))
            + _td(esc(fmt_int(g.get("kept"))))
            + _td(esc(fmt_int(g.get("removed"))))
            + _td(esc(fmt_pct(g.get("removal_rate"))))
            + _td(esc(ci_txt))
            + _td(esc(fmt_pct(g.get("rest_rate"))))
            + _td(esc(fmt_ratio(g.get("ratio_to_overall"))))
            + _td(esc(fmt_p(g.get("q_value"))))
            + _td(rate_bar(g.get("removal_rate"), ci, overall), "")
            + _td(esc(top_txt), "")
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
        f"A group is flagged when a two-proportion test of the group against the rest of the rows is significant "
        f"after Benjamini–Hochberg correction across the groups of that grouping (q &lt; {esc(settings.get('alpha', 0.05))}). "
        "Tables are sorted by significance: flagged groups first.</p>",
    ]
    for name, sec in groups.items():
        out.append(_group(name, sec, overall))
        out.append(_drivers(name, sec, rep))
    return "\n".join(out)


def fmt_p(x: Any) -> str:
    if x is None:
        return "—"
    x = float(x)
    return "<0.0001" if x < 1e-4 else f"{x:.4f}"


def _sig_key(g: dict[str, Any]) -> tuple:
    if g.get("other_groups"):
        return (3, 0, 0)
    if g.get("too_small"):
        return (2, 0, -g.get("rows_in", 0))
    if g.get("significant"):
        return (0, g.get("q_value") or 0.0, -g.get("rows_in", 0))
    return (1, 0, -g.get("rows_in", 0))


def _drivers(name: str, sec: dict[str, Any], rep: dict[str, Any]) -> str:
    """Which rule drives each group's removals: the share of the group failing each rule (its
    marginal effect), with the share removed by that rule alone in brackets."""
    rows = [g for g in sec.get("rows") or [] if "failed_any" in g and not g.get("other_groups")]
    if not rows:
        return ""
    overall = {r["reason"]: r.get("failed_any_share") for r in rep.get("reasons") or []}
    reasons = [r for r in overall if any((g["failed_any"].get(r) or 0) for g in rows)]
    if not reasons:
        return ""
    out = [
        f"<details{' open' if sec.get('flagged_groups') else ''}><summary>Which rule drives it, by {esc(name)}: "
        "share of the group failing each rule (removed by that rule alone)</summary>",
        f"<table><thead><tr><th>{esc(name)}</th>"
        + "".join(f'<th class="n">{esc(r)}</th>' for r in reasons)
        + "</tr></thead><tbody>",
        '<tr><td class="val"><em>all rows</em></td>'
        + "".join(_td(esc(fmt_pct(overall[r]))) for r in reasons)
        + "</tr>",
    ]
    for g in sorted(rows, key=_sig_key):
        n = g.get("rows_in") or 0
        cells = []
        for r in reasons:
            a, o = g["failed_any"].get(r, 0), g["removed_only"].get(r, 0)
            share = a / n if n else None
            hot = (
                share is not None and overall.get(r) and not g.get("too_small") and share > 1.5 * overall[r] and a >= 5
            )
            cells.append(
                f'<td class="n{" hot" if hot else ""}">{esc(fmt_pct(share))} ({esc(fmt_pct(o / n if n else None))})</td>'
            )
        out.append(f"<tr>{_td(esc(g.get('value')), 'val')}{''.join(cells)}</tr>")
    out.append(
        '</tbody></table><p class="note">Red cells: more than 1.5× the rule\'s share over all rows.</p></details>'
    )
    return "\n".join(out)


def _lead(name: str, sec: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The view of a grouping the disparities lead with (docs/REPORTS.md): net of the policy that
    targets it by design when a rule does (its label says so), else all rows."""
    pol = sec.get("policy") or {}
    if pol.get("net"):
        return f"{name} (net of {', '.join(pol['rules'])})", pol["net"]
    return name, sec


def _disparities(rep: dict[str, Any]) -> str:
    """All flagged groups of every grouping in one table, most significant first: the headline.
    A grouping that a rule targets by design is judged net of that policy (_lead)."""
    flagged = []
    groups = rep.get("groups") or {}
    views = dict(_lead(name, sec) for name, sec in groups.items())
    for name, sec in views.items():
        for g in sec.get("rows") or []:
            if g.get("significant") and not g.get("other_groups"):
                flagged.append((name, g))
    if not groups:
        return ""
    tested = sum(sec.get("tested_groups", 0) for sec in views.values())
    small = sum(sec.get("too_small_groups", 0) for sec in views.values())
    total = sum(sec.get("flagged_groups", 0) for sec in views.values())
    listed = min(len(flagged), 40)
    # a grouping shows its largest groups and up to as many flagged ones (most significant first);
    # every group, flagged or not, is in its full table (tables/groups_<column>)
    hidden = (
        f" ({esc(fmt_int(listed))} listed here; every group is in tables/groups_&lt;column&gt;)"
        if total > listed
        else ""
    )
    out = [
        "<h2>Disparities: groups removed at a significantly different rate</h2>",
        f'<p class="note">{esc(fmt_int(total))} flagged of {esc(fmt_int(tested))} groups tested{hidden}; '
        f"{esc(fmt_int(small))} groups too small to judge (in the tables below or their last row, never dropped).</p>",
        _lead_note(groups, total),
    ]
    if not flagged:
        out.append("<p>No group's removal rate differs significantly from the rest of the rows.</p>")
        return "\n".join(out)
    out.append(
        '<table><thead><tr><th>Grouping</th><th>Group</th><th class="n">Rows in</th><th class="n">Removal rate</th>'
        '<th class="n">95% CI</th><th class="n">Rest of rows</th><th class="n">vs overall</th><th class="n">q (BH)</th>'
        "<th>Top rule (first reason)</th></tr></thead><tbody>"
    )
    for name, g in sorted(flagged, key=lambda x: (x[1].get("q_value") or 0.0, -x[1].get("rows_in", 0)))[:40]:
        ci = g.get("ci95")
        by = g.get("removed_by_reason") or {}
        top = max(by.items(), key=lambda kv: kv[1], default=(None, 0))
        tag = "hi" if g.get("direction") == "higher" else "lo"
        out.append(
            "<tr>"
            + _td(esc(name), "")
            + _td(f'<span class="tag {tag}">{esc(g.get("value"))}</span>', "val")
            + _td(esc(fmt_int(g.get("rows_in"))))
            + _td(esc(fmt_pct(g.get("removal_rate"))))
            + _td(esc(f"{fmt_pct(ci[0])} – {fmt_pct(ci[1])}" if ci else "—"))
            + _td(esc(fmt_pct(g.get("rest_rate"))))
            + _td(esc(fmt_ratio(g.get("ratio_to_overall"))))
            + _td(esc(fmt_p(g.get("q_value"))))
            + _td(esc(f"{top[0]} ({fmt_int(top[1])})" if top[1] else ""), "")
            + "</tr>"
        )
    out.append("</tbody></table>")
    return "\n".join(out)


def _lead_note(groups: dict[str, Any], lead_flagged: int) -> str:
    """What the disparities table leads with, and how many flags the view over all rows has."""
    nets = [name for name, sec in groups.items() if (sec.get("policy") or {}).get("net")]
    if not nets:
        return (
            '<p class="note">No rule targets a grouping by design (or none removed a row), so every grouping is '
            "judged over all rows.</p>"
        )
    everything = sum(sec.get("flagged_groups", 0) for sec in groups.values())
    return (
        '<p class="note">This table leads with the <strong>net-of-policy</strong> view: a grouping that a rule '
        f"targets by design ({esc(', '.join(nets))}) is judged among the rows that pass that rule, so a group it "
        "excludes on purpose is not flagged for it; what is flagged there is hit harder by a neutral rule. Over all "
        f"rows, exclusions by policy included, {esc(fmt_int(everything))} groups are flagged "
        f"({esc(fmt_int(lead_flagged))} here): each grouping's table below shows all rows, and “Excluded by "
        "policy” what the targeting rules remove.</p>"
    )


def _policy(rep: dict[str, Any]) -> str:
    """Per grouping that a rule targets by design: what that policy excludes (by group), and the
    groups among the rows that pass it (the net-of-policy table, flagged on its own)."""
    groups = {n: s for n, s in (rep.get("groups") or {}).items() if (s.get("policy") or {}).get("net")}
    if not groups:
        return ""
    out = [
        "<h2>Excluded by policy, and hit harder by a neutral rule</h2>",
        '<p class="note">A rule targets a grouping by design when it reads the grouping\'s column (the language rule: '
        "language; a per-group CLIP threshold: its column). A row that fails such a rule is <em>excluded by "
        "policy</em>, whatever rule removed it first. The rows that pass it are compared group against group as "
        "everywhere else (Wilson interval, two-proportion test against the rest of the passing rows, "
        "Benjamini–Hochberg): a flag there is a group <em>hit harder by a neutral rule</em>.</p>",
    ]
    for name, sec in groups.items():
        pol = sec["policy"]
        net, t = pol["net"], pol["totals"]
        rules = ", ".join(pol["rules"])
        them = f"the {rules} rule" if len(pol["rules"]) == 1 else f"the rules {rules}"
        out.append(
            f"<h3>By {esc(name)}: targeted by {esc(them)}</h3>"
            f"<p>{esc(them[0].upper() + them[1:])} excludes {esc(fmt_int(pol['excluded_rows']))} rows "
            f"({esc(fmt_pct(pol['excluded_share']))} of the input) by policy; "
            f"{esc(fmt_int(pol['groups_excluded_entirely']))} of {esc(fmt_int(net.get('distinct')))} groups entirely. "
            f"Of the {esc(fmt_int(t['rows_in']))} rows that pass, {esc(fmt_int(t['removed']))} "
            f"({esc(fmt_pct(t['removal_rate']))}) are removed by the other rules; "
            f"{esc(fmt_int(net.get('flagged_groups')))} groups flagged among them.</p>"
        )
        hit = [g for g in sec.get("rows") or [] if g.get("excluded_by_policy")]
        if hit:
            out.append(
                f"<details><summary>Rows excluded by policy, by {esc(name)}</summary>"
                f"<table><thead><tr><th>{esc(name)}</th>"
                '<th class="n">Rows in</th><th class="n">Excluded by policy</th><th class="n">% of group</th>'
                "</tr></thead><tbody>"
            )
            for g in sorted(hit, key=lambda g: (bool(g.get("other_groups")), -g["excluded_by_policy"])):
                value = f"<em>{esc(g['value'])}</em>" if g.get("unknown") or g.get("other_groups") else esc(g["value"])
                share = g["excluded_by_policy"] / g["rows_in"] if g.get("rows_in") else None
                out.append(
                    "<tr>"
                    + _td(value, "val")
                    + _td(esc(fmt_int(g.get("rows_in"))))
                    + _td(esc(fmt_int(g["excluded_by_policy"])))
                    + _td(esc(fmt_pct(share)))
                    + "</tr>"
                )
            out.append("</tbody></table></details>")
        # groups with no row passing are counted above; the net table lists the groups with rows
        listed = [g for g in net.get("rows") or [] if g.get("rows_in")]
        view = {
            **net,
            "rows": listed,
            "distinct": net.get("distinct", 0) - pol["groups_excluded_entirely"],
            "shown": sum(not g.get("other_groups") for g in listed),
        }
        out.append(_group(f"{name}, net of {rules}", view, t["removal_rate"]))
    return "\n".join(out)


def _boxes(rep: dict[str, Any]) -> str:
    """CLIP score distribution per group (box: p25–p75, whiskers p05–p95, tick: median)."""
    groups = rep.get("groups") or {}
    thr = rep.get("clip_threshold")
    blocks = []
    for name, sec in groups.items():
        rows = [g for g in sec.get("rows") or [] if (g.get("clip_score") or {}).get("scored")]
        if not rows:
            continue
        rows = rows[:15]
        lo = min(g["clip_score"]["p05"] for g in rows)
        hi = max(g["clip_score"]["p95"] for g in rows)
        if thr is not None:
            lo, hi = min(lo, thr), max(hi, thr)
        span = (hi - lo) or 1.0
        W, rowh, left, right = 640, 18, 150, 20
        H = rowh * len(rows) + 24
        pw = W - left - right

        def x(v, left=left, lo=lo, span=span, pw=pw):  # bound now: the loop rebinds these names
            return left + (v - lo) / span * pw

        svg = [
            f'<svg width="{W}" height="{H}" viewBox="0 0 {W} {H}" role="img" aria-label="CLIP score by {esc(name)}">'
        ]
        for i, g in enumerate(rows):
            c = g["clip_score"]
            y = 4 + i * rowh
            label = str(g.get("value"))
            label = label if len(label) <= 22 else label[:21] + "…"
            svg.append(f'<text x="{left - 6}" y="{y + 11}" text-anchor="end">{esc(label)}</text>')
            svg.append(
                f'<line x1="{x(c["p05"]):.1f}" x2="{x(c["p95"]):.1f}" y1="{y + 7}" y2="{y + 7}" stroke="#8c959f"/>'
            )
            svg.append(
                f'<rect x="{x(c["p25"]):.1f}" y="{y + 2}" width="{max(x(c["p75"]) - x(c["p25"]), 1):.1f}" height="10" fill="#54aeff">'
                f"<title>{esc(label)}: p05 {esc(fmt_num(c['p05']))}, p25 {esc(fmt_num(c['p25']))}, median {esc(fmt_num(c['p50']))}, "
                f"p75 {esc(fmt_num(c['p75']))}, p95 {esc(fmt_num(c['p95']))}, n={esc(fmt_int(c['scored']))}</title></rect>"
            )
            svg.append(
                f'<line x1="{x(c["p50"]):.1f}" x2="{x(c["p50"]):.1f}" y1="{y + 1}" y2="{y + 13}" stroke="#0a3069" stroke-width="2"/>'
            )
        base = 4 + len(rows) * rowh
        for frac in (0, 0.5, 1):
            svg.append(
                f'<text x="{left + frac * pw:.1f}" y="{base + 14}" text-anchor="middle">{esc(fmt_num(lo + frac * span))}</text>'
            )
        if thr is not None:
            svg.append(
                f'<line x1="{x(thr):.1f}" x2="{x(thr):.1f}" y1="0" y2="{base}" stroke="#cf222e" stroke-dasharray="3,3"/>'
            )
        svg.append("</svg>")
        blocks.append(f"<h3>CLIP score by {esc(name)}</h3>" + "".join(svg))
    if not blocks:
        return ""
    return (
        '<h2>CLIP score distribution per group</h2><p class="note">Box: 25th–75th percentile; whiskers: 5th–95th; '
        "dark tick: median; red dashed line: the selection's threshold. A group whose box sits left of the others "
        "scores lower across the board.</p>" + "\n".join(blocks)
    )


_PALETTE = ["#0969da", "#cf222e", "#1a7f37", "#8250df", "#bf8700", "#57606a", "#e16f24", "#1b7c83", "#a40e26"]


def _sweep_svg(thr: list[float], series: list[tuple[str, list[Any]]], mark: float | None) -> str:
    W, H, pl_, pb, pt, pr = 640, 220, 48, 28, 10, 10
    pw, ph = W - pl_ - pr, H - pb - pt
    lo, hi = thr[0], thr[-1]
    span = (hi - lo) or 1.0
    x = lambda v: pl_ + (v - lo) / span * pw  # noqa: E731
    y = lambda r: pt + (1 - r) * ph  # noqa: E731
    out = [f'<svg width="{W}" height="{H}" viewBox="0 0 {W} {H}" role="img" aria-label="retention vs threshold">']
    for r in (0, 0.25, 0.5, 0.75, 1):
        out.append(f'<line x1="{pl_}" x2="{pl_ + pw}" y1="{y(r):.1f}" y2="{y(r):.1f}" stroke="#eaeef2"/>')
        out.append(f'<text x="{pl_ - 4}" y="{y(r) + 4:.1f}" text-anchor="end">{int(r * 100)}%</text>')
    for frac in (0, 0.25, 0.5, 0.75, 1):
        out.append(
            f'<text x="{pl_ + frac * pw:.1f}" y="{H - 8}" text-anchor="middle">{esc(fmt_num(lo + frac * span))}</text>'
        )
    for i, (label, vals) in enumerate(series):
        pts = " ".join(f"{x(t):.1f},{y(v):.1f}" for t, v in zip(thr, vals) if v is not None)
        colour = _PALETTE[i % len(_PALETTE)]
        width = 2.5 if i == 0 else 1.5
        out.append(
            f'<polyline fill="none" stroke="{colour}" stroke-width="{width}" points="{pts}"><title>{esc(label)}</title></polyline>'
        )
    if mark is not None and lo <= mark <= hi:
        out.append(
            f'<line x1="{x(mark):.1f}" x2="{x(mark):.1f}" y1="{pt}" y2="{pt + ph}" stroke="#1b1f24" stroke-dasharray="4,3"/>'
        )
        out.append(f'<text x="{x(mark) + 3:.1f}" y="{pt + 10}">selection</text>')
    out.append("</svg>")
    legend = (
        '<div class="legend">'
        + "".join(
            f'<span><i style="background:{_PALETTE[i % len(_PALETTE)]}"></i>{esc(label)}</span>'
            for i, (label, _) in enumerate(series)
        )
        + "</div>"
    )
    return "".join(out) + legend


def _sweep(rep: dict[str, Any]) -> str:
    sw = rep.get("sweep")
    if not sw:
        note = rep.get("sweep_note")
        return f'<h2>Threshold sweep</h2><p class="note">{esc(note)}</p>' if note else ""
    thr = sw["thresholds"]
    mark = sw.get("selection_threshold")
    exactness = (
        "Counted from the dedup representatives (the rows kept at threshold −inf) with score ≥ t. Not exact here: "
        f"{sw['near_dedup']}. Check a threshold with curate select."
        if sw.get("near_dedup")  # why (reports/sweep.py NEAR_DEDUP_CAVEAT)
        else "Exact, not estimated: dedup survivors are the same rows at every threshold (highest score wins), so "
        "the rows kept at threshold t are the dedup representatives with score ≥ t."
    )
    out = [
        "<h2>Threshold sweep: retention vs CLIP threshold</h2>",
        '<p class="note">Retention = rows kept / rows in, with every other rule (missing URL, language, caption, fetch, image, '
        f"dedup) as in this selection and only the CLIP threshold varied. {esc(exactness)}</p>",
    ]
    pg = sw.get("per_group")
    if pg:  # per-group thresholds: the axis is the default, every named group moves with it (docs/POLICY.md)
        at = thr.index(mark) if mark in thr else 0
        named = ", ".join(f"{g} {v[at]:g}" for g, v in pg["thresholds"].items())
        out.append(
            f'<p class="note">Per-group thresholds by {esc(pg["by"])}: the threshold axis is the default '
            f"(min_score {esc(fmt_num(pg['default'], 4))}, every {esc(pg['by'])} value not named); each named value's "
            f"threshold moves with it by the same offset ({esc(named)} at the selection's point). Exact when no "
            f"duplicate group holds copies with different thresholds; `curate sweep` checks it.</p>"
        )
    for name, curves in (sw.get("groups") or {}).items():
        series = [("all rows", sw["overall"]["retention"])] + [
            (f"{c['value']} ({fmt_int(c['rows_in'])})", c["retention"]) for c in curves
        ]
        out.append(f"<h3>By {esc(name)}</h3>" + _sweep_svg(thr, series, mark))
    # compact table: overall + groups of the first grouping at a few thresholds
    idx = sorted(
        set(
            [0, len(thr) // 4, len(thr) // 2, (3 * len(thr)) // 4, len(thr) - 1]
            + ([min(range(len(thr)), key=lambda i: abs(thr[i] - mark))] if mark is not None else [])
        )
    )
    first = next(iter((sw.get("groups") or {}).items()), (None, []))
    head = "".join(f'<th class="n">{esc(fmt_num(thr[i]))}</th>' for i in idx)
    out.append(f"<details><summary>Retention table</summary><table><thead><tr><th>group</th>{head}</tr></thead><tbody>")
    rows = [("all rows", sw["overall"]["retention"])] + [(c["value"], c["retention"]) for c in first[1]]
    for label, vals in rows:
        out.append(f"<tr>{_td(esc(label), 'val')}" + "".join(_td(esc(fmt_pct(vals[i]))) for i in idx) + "</tr>")
    out.append("</tbody></table></details>")
    fl = rep.get("flips")
    if fl:
        out.append(f"<h3>What changes between threshold {esc(fmt_num(fl['a']))} and {esc(fmt_num(fl['b']))}</h3>")
        out.append(
            f"<p>{esc(fmt_int(fl['rows']))} rows are kept at {esc(fmt_num(min(fl['a'], fl['b'])))} and removed "
            f"(clip_score) at {esc(fmt_num(max(fl['a'], fl['b'])))}; no other row changes fate.</p>"
        )
        for name, gs in (fl.get("groups") or {}).items():
            if not gs:
                continue
            out.append(
                f"<details><summary>Groups that lose the most, by {esc(name)}</summary><table><thead><tr><th>{esc(name)}</th>"
                '<th class="n">Rows flipping</th><th class="n">Rows in</th><th class="n">Retention drop</th></tr></thead><tbody>'
            )
            for g in gs:
                out.append(
                    "<tr>"
                    + _td(esc(g["value"]), "val")
                    + _td(esc(fmt_int(g["flips"])))
                    + _td(esc(fmt_int(g["rows_in"])))
                    + _td(esc(fmt_pct(g["retention_change"])))
                    + "</tr>"
                )
            out.append("</tbody></table></details>")
        if fl.get("sample"):
            out.append(
                '<details><summary>Sample of flipping rows</summary><table><thead><tr><th class="n">score</th><th>caption</th>'
                "<th>uid</th></tr></thead><tbody>"
            )
            for r in fl["sample"]:
                out.append(
                    "<tr>"
                    + _td(esc(fmt_num(r.get("clip_score"), 4)))
                    + _td(esc(r.get("caption")), "")
                    + _td(esc(r.get("uid")), "val")
                    + "</tr>"
                )
            out.append("</tbody></table></details>")
    return "\n".join(out)


def _tradeoff_svg(points: list[dict[str, Any]]) -> str:
    """Removal rate (among the candidates) against retention: one line per group under one
    threshold, and the rate every group gets with equalised thresholds (dashed)."""
    W, H, left, bottom, top, right = 640, 220, 48, 28, 10, 28
    pw, ph = W - left - right, H - bottom - top
    xs = [p["single"]["retention"] for p in points]
    lo, hi = min(xs), max(xs)
    span = (hi - lo) or 1.0
    x = lambda v: left + (v - lo) / span * pw  # noqa: E731
    y = lambda r: top + (1 - r) * ph  # noqa: E731
    out = [f'<svg width="{W}" height="{H}" viewBox="0 0 {W} {H}" role="img" aria-label="removal rate vs retention">']
    for r in (0, 0.25, 0.5, 0.75, 1):
        out.append(f'<line x1="{left}" x2="{left + pw}" y1="{y(r):.1f}" y2="{y(r):.1f}" stroke="#eaeef2"/>')
        out.append(f'<text x="{left - 4}" y="{y(r) + 4:.1f}" text-anchor="end">{int(r * 100)}%</text>')
    for frac in (0, 0.5, 1):
        out.append(
            f'<text x="{left + frac * pw:.1f}" y="{H - 8}" text-anchor="middle">{esc(fmt_pct(lo + frac * span))}</text>'
        )
    labels = [g["value"] for g in points[0]["single"]["groups"] if g["candidates"]]
    for i, label in enumerate(labels):
        pts = []
        for p in points:
            g = next((g for g in p["single"]["groups"] if g["value"] == label), None)
            if g is not None and g["removal_rate"] is not None:
                pts.append(f"{x(p['single']['retention']):.1f},{y(g['removal_rate']):.1f}")
        out.append(
            f'<polyline fill="none" stroke="{_PALETTE[i % len(_PALETTE)]}" stroke-width="1.5" points="{" ".join(pts)}">'
            f"<title>{esc(label)}: one threshold</title></polyline>"
        )
    eq = " ".join(f"{x(p['equalised']['retention']):.1f},{y(p['equalised']['removal_rate']):.1f}" for p in points)
    out.append(
        f'<polyline fill="none" stroke="#1b1f24" stroke-width="2" stroke-dasharray="5,3" points="{eq}">'
        "<title>every group, equalised thresholds</title></polyline>"
    )
    out.append("</svg>")
    legend = (
        '<div class="legend">'
        + "".join(
            f'<span><i style="background:{_PALETTE[i % len(_PALETTE)]}"></i>{esc(label)}</span>'
            for i, label in enumerate(labels)
        )
        + '<span><i style="background:#1b1f24"></i>equalised (every group)</span></div>'
    )
    return "".join(out) + legend


def _tradeoff(rep: dict[str, Any]) -> str:
    """The retention-disparity trade-off (reports/tradeoff.py): a decision aid, never applied."""
    to = rep.get("tradeoff")
    if not to:
        return ""
    col = to["column"]
    points = [p for p in to["points"] if p["feasible"]]
    out = [
        f"<h2>Trade-off: retention vs disparity by {esc(col)}</h2>",
        '<p class="note">A decision aid: nothing here changes the selection. For a target retention (rows kept / rows '
        f"in), one CLIP threshold is set to reach it, or one threshold per {esc(col)} value is set so that every "
        "group loses the same share of its <i>candidates</i> (rows every other rule, dedup included, keeps: the rows "
        f"the CLIP threshold decides). Removal rate here = that share. The {fmt_int(len(to['units']) - 1)} largest "
        f"values with at least {fmt_int(to['min_candidates'])} candidates get a threshold of their own; every other "
        "value and rows with none share the default (“(other)”). Every number is counted from the thresholds "
        "shown (score ≥ threshold, as the rule compares), and equals a selection with them when no duplicate group "
        f"holds copies of two {esc(col)} values (curate sweep --equalize checks it). docs/POLICY.md.</p>",
    ]
    if not points:
        out.append(
            f'<p class="note">No target is reachable: at most {esc(fmt_pct(to.get("max_retention")))} of the rows '
            "can be kept by any threshold.</p>"
        )
        return "\n".join(out)
    out.append(_tradeoff_svg(points))
    out.append(
        '<table><thead><tr><th class="n">Target retention</th><th class="n">One threshold</th>'
        '<th class="n">Removal rates (min–max)</th><th class="n">Ratio</th><th class="n">Mean score kept</th>'
        '<th class="n">Equalised: thresholds</th><th class="n">Removal rates (min–max)</th>'
        '<th class="n">Retention</th><th class="n">Mean score kept</th></tr></thead><tbody>'
    )
    for p in points:
        one, eq = p["single"], p["equalised"]
        ts = [*eq["thresholds"].values(), eq["default"]]
        d = (
            None
            if eq["score"]["mean"] is None or one["score"]["mean"] is None
            else eq["score"]["mean"] - one["score"]["mean"]
        )
        out.append(
            "<tr>"
            + _td(esc(fmt_pct(p["target_retention"])))
            + _td(esc(fmt_num(one["threshold"], 4)))
            + _td(esc(f"{fmt_pct(one['rate_min'])} – {fmt_pct(one['rate_max'])}"))
            + _td(esc(fmt_ratio(one["rate_ratio"])))
            + _td(esc(fmt_num(one["score"]["mean"], 4)))
            + _td(esc(f"{fmt_num(min(ts), 4)} – {fmt_num(max(ts), 4)}"))
            + _td(esc(f"{fmt_pct(eq['rate_min'])} – {fmt_pct(eq['rate_max'])}"))
            + _td(esc(fmt_pct(eq["retention"])))
            + _td(esc(fmt_num(eq["score"]["mean"], 4) + ("" if d is None else f" ({d:+.4f})")))
            + "</tr>"
        )
    out.append("</tbody></table>")
    out.append("<details><summary>The thresholds, per target (spec lines)</summary><table><tbody>")
    for p in points:
        for name in ("single", "equalised"):
            out.append(
                "<tr>"
                + _td(esc(f"{fmt_pct(p['target_retention'])} {name}"), "")
                + _td(f"<code>{esc(p[name]['spec'])}</code>", "")
                + "</tr>"
            )
    out.append("</tbody></table></details>")
    return "\n".join(out)


def _per_group_note(gal: dict[str, Any]) -> str:
    """With per-group CLIP thresholds, the heading's addition after the default: `; per language: en 0.28`."""
    pg = gal.get("per_group")
    if not pg:
        return ""
    own = ", ".join(f"{v} {fmt_num(t)}" for v, t in pg["thresholds"].items())
    return esc(f"; per {pg['by']}: {own}")


def _gallery(rep: dict[str, Any]) -> str:
    gal = rep.get("gallery")
    if not gal:
        return ""
    thumbs = rep.get("_thumbs") or {}
    out = [
        f"<h2>Boundary gallery (threshold {esc(fmt_num(gal['threshold']))}{_per_group_note(gal)}, by "
        f"{esc(gal['column'])})</h2>",
        f'<p class="note">For each of the largest groups, {esc(gal["per_side"])} pairs sampled (seed {esc(gal["seed"])}) from '
        f"the {esc(gal['window'])} nearest the threshold on each side: green = just kept, red = just removed. "
        "Is the threshold in the right place for every group?</p>",
    ]
    for g in gal.get("groups") or []:
        out.append(f"<h3>{esc(g['value'])}</h3>")
        for side, label in (("above", "just above (kept)"), ("below", "just below (removed)")):
            items = g.get(side) or []
            out.append(f'<div class="side">{esc(label)}</div><div class="gal">')
            if not items:
                out.append('<span class="note">none</span>')
            for p in items:
                uri = thumbs.get(p.get("uid"))
                img = (
                    f'<img alt="" src="{esc(uri)}">'
                    if uri and uri.startswith("data:image/")
                    else '<div class="noimg">no image</div>'
                )
                cap = p.get("caption") or ""
                cap = cap if len(cap) <= 160 else cap[:159] + "…"
                out.append(
                    f'<div class="gcard {side}">{img}<div><strong>{esc(fmt_num(p.get("clip_score"), 4))}</strong></div>'
                    f'<div class="cap">{esc(cap)}</div></div>'
                )
            out.append("</div>")
    return "\n".join(out)


def _clip(rep: dict[str, Any]) -> str:
    c = rep.get("clip_score")
    if not c:
        return '<h2>CLIP scores</h2><p class="note">No clip_score column.</p>'
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
        _failed_shards(report),
        _disparities(report),
        _policy(report),
        _groups(report),
        _reasons(report),
        _concepts(report),
        _boxes(report),
        _sweep(report),
        _tradeoff(report),
        _gallery(report),
        _clip(report),
        _fetch(report),
        _shards(report),
        _meta(report),
    ]
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">\n'
        "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; style-src 'unsafe-inline'; img-src data:\">\n"
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{esc(title)}</title>\n<style>{CSS}</style></head>\n<body>\n"
        + "\n".join(p for p in body if p)
        + "\n</body></html>\n"
    )


__all__ = ["render_html", "esc"]
