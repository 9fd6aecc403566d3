"""`curate diff A B`: compare two selections (or runs): Jaccard overlap of kept uids, per-group
change in retention, and the differences in configuration (manifest spec, selection rules and
resolved threshold)."""

from __future__ import annotations

import json
from typing import Any

import polars as pl

from curate import annotations, io, manifest, schema, store
from curate.reports.html import CSS, _td, esc, fmt_int, fmt_pct
from curate.names import is_name  # not curate's hidden staging folders
from curate import publish

GROUPS = (schema.DOMAIN, schema.TLD, schema.LANGUAGE)


def resolve_selection(path: str) -> tuple[str, str]:
    """A selection dir (selections/<name>) or a run dir (its 'default' selection, else its only
    one). Returns (run_dir, the folder to read: the selection's published version)."""
    p = path.rstrip("/")
    here = publish.resolve(p)
    if io.exists(io.join(here, "selection.json")):
        return p.rsplit(f"/{store.SELECTIONS}/", 1)[0] if f"/{store.SELECTIONS}/" in p else p, here
    sels = store.selections_dir(p)
    names = []
    if io.exists(sels):
        fs, sp = io.fs_and_path(sels)
        for x in fs.ls(sp, detail=False):
            name = x.rstrip("/").rsplit("/", 1)[-1]
            if is_name(name) and io.exists(io.join(publish.resolve(io.join(sels, name)), "selection.json")):
                names.append(name)
    found = ["default"] if "default" in names else sorted(names)
    if len(found) == 1:
        return p, publish.resolve(io.join(sels, found[0]))
    raise FileNotFoundError(f"{path}: not a selection directory, and no single selection under {sels} ({found})")


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: d}


def _rows(run_dir: str, sel_dir: str, cols: list[str]) -> pl.LazyFrame:
    """`cols` and kept of every row of a selection, whatever it wrote (selection.write): columns a
    part lacks (removed/ and decisions/ hold the decision columns only with "kept" and
    "decisions") come from the run's annotations by (shard, row); null when those lack them too."""
    parts = []
    ann: pl.LazyFrame | None = None
    looked = False  # for the run's annotations (once)
    for sub, kept in (("kept", True), ("removed", False), ("decisions", None)):
        d = io.join(sel_dir, sub)
        if not (io.exists(d) and io.list_files(d)):
            continue
        lf = pl.scan_parquet(io.join(d, "*.parquet"))
        have = set(lf.collect_schema().names())
        missing = [c for c in cols if c not in have]
        if missing and not looked:
            looked = True
            shards = annotations.completed_shards(run_dir) if io.exists(run_dir) else []
            # a selection folder away from its run: what its files lack stays null
            ann = annotations.scan(run_dir, shards, include_forgotten=True) if shards else None
        if missing and ann is not None:
            names = set(ann.collect_schema().names()) - {schema.SHARD, schema.ROW}
            lf = lf.join(
                ann.select(schema.SHARD, schema.ROW, *[c for c in missing if c in names]),
                on=[schema.SHARD, schema.ROW],
                how="left",
            )
            have |= names
        flag = pl.col(schema.KEPT) if kept is None else pl.lit(kept)
        parts.append(
            lf.select(
                *[pl.col(c) if c in have else pl.lit(None, pl.String).alias(c) for c in cols], flag.alias(schema.KEPT)
            )
        )
    return pl.concat(parts, how="vertical_relaxed")


def diff(a: str, b: str, *, group_columns: tuple[str, ...] = GROUPS, top: int = 15) -> dict[str, Any]:
    run_a, sel_a = resolve_selection(a)
    run_b, sel_b = resolve_selection(b)
    cols = [schema.UID, schema.SHARD, schema.ROW, *group_columns]
    ra, rb = _rows(run_a, sel_a, cols), _rows(run_b, sel_b, cols)
    ka = ra.filter(pl.col(schema.KEPT)).select(schema.UID).unique()
    kb = rb.filter(pl.col(schema.KEPT)).select(schema.UID).unique()
    both = ka.join(kb, on=schema.UID, how="inner").select(pl.len()).collect().item()
    na, nb = ka.select(pl.len()).collect().item(), kb.select(pl.len()).collect().item()
    union = na + nb - both
    out: dict[str, Any] = {
        "a": sel_a,
        "b": sel_b,
        "kept_a": na,
        "kept_b": nb,
        "kept_both": both,
        "only_a": na - both,
        "only_b": nb - both,
        "jaccard": both / union if union else None,
        "groups": {},
        "config": {},
    }
    for c in group_columns:
        ga = ra.group_by(c).agg(pl.len().alias("rows_a"), pl.col(schema.KEPT).sum().alias("kept_a"))
        gb = rb.group_by(c).agg(pl.len().alias("rows_b"), pl.col(schema.KEPT).sum().alias("kept_b"))
        g = (
            ga.join(gb, on=c, how="full", coalesce=True, nulls_equal=True)
            .with_columns(
                (pl.col("kept_a") / pl.col("rows_a")).alias("retention_a"),
                (pl.col("kept_b") / pl.col("rows_b")).alias("retention_b"),
            )
            .with_columns((pl.col("retention_b") - pl.col("retention_a")).alias("change"))
            .collect()
        )
        g = g.sort(pl.col("change").abs(), descending=True, nulls_last=True)
        out["groups"][c] = [
            {
                "value": "(unknown)" if r[c] is None else str(r[c]),
                **{k: r[k] for k in ("rows_a", "kept_a", "rows_b", "kept_b", "retention_a", "retention_b", "change")},
            }
            for r in g.head(top).iter_rows(named=True)
        ]
    conf = {}
    for label, run, sel in (("a", run_a, sel_a), ("b", run_b, sel_b)):
        s = io.read_json(io.join(sel, "selection.json"))
        m = manifest.read_if_present(run)  # None: a selection folder outside its run (no spec to compare)
        conf[label] = {
            **_flatten(m.spec if m is not None else {}, "spec"),
            **_flatten(s.get("rules") or {}, "rules"),
            **_flatten(s.get("resolved") or {}, "resolved"),
        }
    out["clip_thresholds"] = clip_thresholds(
        *(io.read_json(io.join(sel, "selection.json")).get("rules") or {} for sel in (sel_a, sel_b))
    )
    keys = sorted(set(conf["a"]) | set(conf["b"]))
    out["config"] = {
        k: {"a": conf["a"].get(k), "b": conf["b"].get(k)}
        for k in keys
        if json.dumps(conf["a"].get(k), sort_keys=True, default=str)
        != json.dumps(conf["b"].get(k), sort_keys=True, default=str)
    }
    return out


def clip_thresholds(rules_a: dict[str, Any], rules_b: dict[str, Any]) -> dict[str, Any] | None:
    """The CLIP threshold each group gets in A and in B, when either has per-group thresholds
    (clip.by): one row per (column, value) either names, then every other value (min_score), each
    with the threshold in A and in B: that side's own for the value when it groups by the same
    column, its min_score when it has one threshold for all, None when it has no CLIP threshold or
    groups by another column (the row's threshold then depends on that column). None when neither
    side has per-group thresholds."""
    clips = [r.get("clip") or {} for r in (rules_a, rules_b)]
    if not any(c.get("by") for c in clips):
        return None

    def threshold(clip: dict[str, Any], column: str | None, value: str | None) -> float | None:
        if clip.get("by") is None:
            return clip.get("min_score")
        if column is None:
            return clip.get("min_score")
        if clip["by"] != column:
            return None
        return (clip.get("thresholds") or {}).get(value, clip.get("min_score"))

    named = list(dict.fromkeys((c["by"], v) for c in clips if c.get("by") for v in c.get("thresholds") or {}))
    rows = []
    for column, value in [*named, (None, None)]:
        a, b = threshold(clips[0], column, value), threshold(clips[1], column, value)
        label = (
            OTHER_GROUPS
            if column is None
            else value
            if len({c.get("by") for c in clips} - {None}) == 1
            else f"{column}={value}"
        )
        rows.append({"column": column, "value": label, "a": a, "b": b, "changed": a != b})
    return {
        "by_a": clips[0].get("by"),
        "by_b": clips[1].get("by"),
        # a top fraction resolves to a threshold of its own: compared as resolved.clip_threshold
        "top_fraction_a": clips[0].get("top_fraction"),
        "top_fraction_b": clips[1].get("top_fraction"),
        "groups": rows,
    }


OTHER_GROUPS = "(every other value)"


def render_diff_html(d: dict[str, Any]) -> str:
    body = [f"<h1>Diff: {esc(d['a'])} vs {esc(d['b'])}</h1>", '<div class="cards">']
    for k, v in (
        ("Kept A", fmt_int(d["kept_a"])),
        ("Kept B", fmt_int(d["kept_b"])),
        ("Both", fmt_int(d["kept_both"])),
        ("Jaccard", "—" if d["jaccard"] is None else f"{d['jaccard']:.3f}"),
    ):
        body.append(f'<div class="card"><div class="k">{esc(k)}</div><div class="v">{esc(v)}</div></div>')
    body.append("</div><h2>Configuration differences</h2>")
    if d["config"]:
        body.append("<table><thead><tr><th>key</th><th>A</th><th>B</th></tr></thead><tbody>")
        for k, v in d["config"].items():
            body.append(
                "<tr>"
                + _td(esc(k), "val")
                + _td(esc(json.dumps(v["a"], default=str)), "val")
                + _td(esc(json.dumps(v["b"], default=str)), "val")
                + "</tr>"
            )
        body.append("</tbody></table>")
    else:
        body.append("<p>None.</p>")
    ct = d.get("clip_thresholds")
    if ct:
        by = " / ".join(dict.fromkeys(str(x) for x in (ct["by_a"], ct["by_b"]) if x))
        body.append(
            f"<h2>CLIP threshold per {esc(by)}</h2><table><thead><tr><th>{esc(by)}</th>"
            '<th class="n">A</th><th class="n">B</th></tr></thead><tbody>'
        )
        for r in ct["groups"]:
            mark = ' style="font-weight:600"' if r["changed"] else ""
            body.append(
                f"<tr{mark}>"
                + _td(esc(r["value"]), "val")
                + _td(esc("—" if r["a"] is None else f"{r['a']:g}"))
                + _td(esc("—" if r["b"] is None else f"{r['b']:g}"))
                + "</tr>"
            )
        body.append("</tbody></table>")
    for c, rows in d["groups"].items():
        body.append(
            f"<h2>Retention change by {esc(c)} (largest first)</h2><table><thead><tr><th>{esc(c)}</th>"
            '<th class="n">Rows</th><th class="n">Retention A</th><th class="n">Retention B</th><th class="n">Change</th></tr></thead><tbody>'
        )
        for r in rows:
            ch = r["change"]
            body.append(
                "<tr>"
                + _td(esc(r["value"]), "val")
                + _td(esc(fmt_int(r["rows_a"] if r["rows_a"] is not None else r["rows_b"])))
                + _td(esc(fmt_pct(r["retention_a"])))
                + _td(esc(fmt_pct(r["retention_b"])))
                + _td(esc("—" if ch is None else f"{100 * ch:+.1f} pp"))
                + "</tr>"
            )
        body.append("</tbody></table>")
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; style-src 'unsafe-inline'\">"
        f"<title>curate diff</title><style>{CSS}</style></head><body>" + "\n".join(body) + "</body></html>\n"
    )
