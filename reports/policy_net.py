"""Disparity net of the policy that defines the group.

Some rules treat groups differently by design: an English-only language rule removes every French
caption, a per-language CLIP threshold holds each language to its own bar. Over all rows such a
group is removed at a very different rate, flagged, and the flag says nothing a reviewer did not
choose. So for each grouping the report also compares the groups among the rows that pass the rules
that *target* that grouping (the net-of-policy view): what is left is "hit harder by a neutral rule",
and the rows those rules fail are counted apart as "excluded by policy".

Which rules target a grouping is derived from the rule registry (curate/filters/rules.py): a rule
targets every column it reads under the selection (`Rule.inputs_for`: its declared `inputs`, so the
language rule targets `language`, and the columns the spec names for it, `Rule.spec_inputs`, so a
per-group CLIP threshold keyed on a column, `selection.clip.by`, targets that column). A new rule
that treats groups differently by design declares the column the same way. A rule that fails no
row changes nothing and is left out.

A row is excluded by policy when its `reasons` (every rule it fails, filters/decide.py) hold a
targeting rule, also when a neutral rule comes first in its `reason`. The net view's counts are
then the report's usual counts over the rows that are not excluded, with the same statistics
(Wilson interval, two-proportion test against the rest of the *passing* rows, Benjamini-Hochberg
across the grouping's tested groups, curate/reports/groups.py) on both engines: the counts are
group-by sums, computed in parts like every per-group table.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import polars as pl

from curate.config import SelectionConfig
from curate.filters.rules import RULE_ORDER, RULES, Rule
from curate.schema import KEPT, REASON, REASONS

EXCLUDED = "excluded_by_policy"  # count column: rows of the group a targeting rule fails
LEAD_VIEW = "net_of_policy"  # the view the disparities table leads with (report settings)

_REASONS = [r.value for r in RULE_ORDER]


def rule_targets(rule: Rule, sel: SelectionConfig | None = None) -> tuple[str, ...]:
    """The columns `rule` targets by design: every column it reads under `sel` (without a
    selection: the columns the registry declares for every selection)."""
    return rule.inputs if sel is None else rule.inputs_for(sel)


def targeting(columns: Sequence[str], sel: SelectionConfig | None = None) -> dict[str, tuple[str, ...]]:
    """Grouping column -> the reasons of the rules that target it by design, in rule order (an
    empty tuple: no rule does). Without `sel`, only what the registry declares."""
    return {c: tuple(r.reason for r in RULES if c in rule_targets(r, sel)) for c in columns}


def active(policy: Mapping[str, Sequence[str]], failed_any: Mapping[str, int]) -> dict[str, tuple[str, ...]]:
    """The groupings that get a net view: their targeting rules that fail at least one row
    (`failed_any`: rows failing each rule); groupings left with none are left out."""
    out = {}
    for c, reasons in policy.items():
        unknown = [r for r in reasons if r not in _REASONS]
        if unknown:
            raise ValueError(f"policy for grouping {c!r}: {unknown} are not rules (filters/rules.py: {_REASONS})")
        hit = tuple(r for r in reasons if int(failed_any.get(r) or 0) > 0)
        if hit:
            out[c] = hit
    return out


def excluded(reasons: Sequence[str]) -> pl.Expr:
    """True where a row fails any of these rules (its `reasons` list holds one of them)."""
    return pl.any_horizontal([pl.col(REASONS).list.contains(r) for r in reasons]).fill_null(False)


def net_count_exprs(reasons: Sequence[str], order: Sequence[str] = _REASONS) -> list[pl.Expr]:
    """The report's per-slice counts (rows_in, kept, removed, r:<rule> by first reason, for each
    reason of `order`: the selection's reason_order) over the rows that pass every rule in
    `reasons`, and how many rows of the slice fail one (EXCLUDED)."""
    hit = excluded(reasons)
    passes = hit.not_()
    kept = pl.col(KEPT)
    removed = kept.not_() & passes  # null kept -> null -> counted in rows_in only, as in the report
    exprs = [
        passes.cast(pl.Int64).sum().alias("rows_in"),
        (kept & passes).cast(pl.Int64).sum().alias("kept"),
        removed.cast(pl.Int64).sum().alias("removed"),
    ]
    exprs += [(removed & (pl.col(REASON) == r)).cast(pl.Int64).sum().alias(f"r:{r}") for r in order]
    return [*exprs, hit.cast(pl.Int64).sum().alias(EXCLUDED)]


def net_name(column: str) -> str:
    """The net view's name: its key among the per-group counts, its problems' prefix."""
    return f"{column} (net of policy)"


def table_name(column: str) -> str:
    """The net view's full table under tables/ (every group, in parts, as groups_<column>)."""
    return f"groups_net_of_policy_{column}"


def summary(reasons: Sequence[str], net_totals: Mapping[str, int], rows_in: int, empty: int) -> dict:
    """The grouping's policy line: the targeting rules, the rows they exclude (of `rows_in`), the
    groups they exclude entirely (`empty`: no row passes) and the passing rows' totals."""
    n, x = int(net_totals["rows_in"]), int(net_totals["removed"])
    ex = int(net_totals[EXCLUDED])
    return {
        "rules": list(reasons),
        "excluded_rows": ex,
        "excluded_share": ex / rows_in if rows_in else None,
        "groups_excluded_entirely": empty,
        "totals": {
            "rows_in": n,
            "kept": int(net_totals["kept"]),
            "removed": x,
            "removal_rate": x / n if n else None,
        },
    }
