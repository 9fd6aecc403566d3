"""Typed records of the run directory: the shard completion marker (ShardMarker), the run totals
summed from the markers (RunTotals) and the manifest (Manifest, a dict with typed accessors).

Why: these files were read as plain dicts with `.get(key, default)`, so a renamed or mistyped key
showed up as "—" or 0 in a report instead of failing. Reading one now either gives a value of the
right type or raises a ValueError that names the file and the key. Where an older curate wrote
fewer keys, the default is stated here, next to the field, and nowhere else.

The JSON on disk is unchanged: the same keys, so run directories written before keep working.
A leaf module (no curate imports): curate/store.py reads and writes markers through it, and
curate/manifest.py makes the Manifest.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

_MISSING = object()


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _count(v: Any, what: str) -> int:
    """A non-negative integer, or a ValueError naming `what`."""
    if not _is_int(v) or v < 0:
        raise ValueError(f"{what} should be a non-negative integer, not {v!r}")
    return v


def _seconds(v: Any, what: str) -> float | int:
    if not (_is_int(v) or isinstance(v, float)) or v < 0:
        raise ValueError(f"{what} should be a non-negative number of seconds, not {v!r}")
    return v


def _status_counts(v: Any, what: str) -> dict[str, int]:
    """{fetch status: rows}, as the annotation file's value counts."""
    if not isinstance(v, dict):
        raise ValueError(f"{what} should be an object of {{status: rows}}, not {v!r}")
    for k, n in v.items():
        if not isinstance(k, str):
            raise ValueError(f"{what} has a non-text status {k!r}")
        _count(n, f"{what}[{k!r}]")
    return v


def _object(data: Any, source: str, kind: str) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise ValueError(f"{source}: not a {kind} (a JSON object was expected, found {type(data).__name__})")
    return data


def _check_keys(data: dict[str, Any], known: set[str], required: set[str], source: str, kind: str) -> None:
    """Missing required keys and unknown keys both fail: with optional keys defaulting, an unknown
    key is how a renamed one shows up."""
    missing = sorted(required - data.keys())
    if missing:
        raise ValueError(f"{source}: {kind} has no {', '.join(map(repr, missing))}")
    unknown = sorted(data.keys() - known)
    if unknown:
        raise ValueError(f"{source}: {kind} has unknown key(s) {', '.join(map(repr, unknown))}")


# --- the shard completion marker: annotations/<shard>.done ----------------------------------------
@dataclass(frozen=True, kw_only=True)
class ShardMarker:
    """What a finished shard's marker says (written last by shard_jobs.finish_shard, rewritten by
    forget.clean_shard). Fields in the order of the file; optional ones say what an older marker
    lacks and what it means."""

    shard: str
    rows: int  # rows in the shard's annotation file
    scored: int  # rows of it holding a CLIP score
    fetch_status: dict[str, int]  # rows per fetch status (sums to rows)
    # rows in the input shard. Absent before `curate forget` existed: rows + forgotten (nothing
    # was forgotten then, so rows)
    rows_read: int
    forgotten: int = 0  # rows left out on a deletion request. Absent before `curate forget`: 0
    # rows sent to the fetcher and fetched OK by this shard's last prepare. Absent (None) in the
    # markers of scored shards written before the scoring call carried the prepare counts; the
    # run totals count None as 0
    fetch_attempted: int | None = None
    fetch_ok: int | None = None
    # timings (seconds) and rows scored by the finishing call; None where no such step ran
    # (a shard that needed no scoring has no score_s / scored_now) or an older curate did not record it
    prepare_s: float | None = None
    scored_now: int | None = None
    score_s: float | None = None
    # windows the shard's fetch was cut into (each fetched by one task and scored by one call, on
    # whichever actor was free); None: no fetch, or an older curate that fetched a shard whole
    windows: int | None = None
    finished_at: str  # UTC, "%Y-%m-%dT%H:%M:%SZ"

    def __post_init__(self) -> None:
        if not isinstance(self.shard, str) or not self.shard:
            raise ValueError(f"'shard' should be the shard's name, not {self.shard!r}")
        for name in ("rows", "scored", "rows_read", "forgotten"):
            _count(getattr(self, name), repr(name))
        for name in ("fetch_attempted", "fetch_ok", "scored_now", "windows"):
            if getattr(self, name) is not None:
                _count(getattr(self, name), repr(name))
        for name in ("prepare_s", "score_s"):
            if getattr(self, name) is not None:
                _seconds(getattr(self, name), repr(name))
        _status_counts(self.fetch_status, "'fetch_status'")
        if not isinstance(self.finished_at, str):
            raise ValueError(f"'finished_at' should be a UTC time stamp, not {self.finished_at!r}")

    @classmethod
    def from_json(cls, data: Any, source: str) -> ShardMarker:
        """A marker as read from `source` (for the error messages). A missing required key, an
        unknown key or a value of the wrong type is a ValueError naming `source` and the key."""
        data = _object(data, source, "completion marker")
        names = {f.name for f in fields(cls)}
        _check_keys(data, names, _MARKER_REQUIRED, source, "completion marker")
        values = dict(data)
        try:
            if "rows_read" not in values:  # before `curate forget`: nothing forgotten, every row read kept
                values["rows_read"] = _count(values["rows"], "'rows'") + _count(
                    values.get("forgotten", 0), "'forgotten'"
                )
            return cls(**values)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{source}: {e}") from None

    def to_json(self) -> dict[str, Any]:
        """The marker file's object: the keys finish_shard has always written (None: left out)."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}
        return {**out, "fetch_status": dict(self.fetch_status)}  # a copy: the record stays as read


# what every marker since the first curate has: shard, rows, scored, fetch_status, finished_at
_MARKER_REQUIRED = {"shard", "rows", "scored", "fetch_status", "finished_at"}


# --- run totals: the manifest's "counts" ----------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class RunTotals:
    """Counts per stage over a run's completed shards, summed from their markers (accounting.run_totals)."""

    shards_complete: int
    rows: int
    forgotten: int
    fetch_attempted: int
    fetch_ok: int
    scored: int
    fetch_status: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for f in fields(self):
            if f.name != "fetch_status":
                _count(getattr(self, f.name), repr(f.name))
        _status_counts(self.fetch_status, "'fetch_status'")

    @classmethod
    def from_json(cls, data: Any, source: str) -> RunTotals:
        data = _object(data, source, "run totals object")
        names = {f.name for f in fields(cls)}
        _check_keys(data, names, names, source, "'counts'")
        try:
            return cls(**data)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{source}: 'counts': {e}") from None

    def to_json(self) -> dict[str, Any]:
        return {**{f.name: getattr(self, f.name) for f in fields(self)}, "fetch_status": dict(self.fetch_status)}


# --- the manifest: manifest.json --------------------------------------------------------------------
RUN_STATES = ("running", "selecting", "complete", "failed", "interrupted")  # curate/runner.py writes these


class Manifest(dict):
    """manifest.json as read or made: a dict, so the file format and every writer stay as they are,
    with typed accessors for what readers use. An accessor raises a ValueError naming the file and
    the key when the key is missing or holds the wrong type; the few keys an older curate did not
    write say so, with their default. Nothing is checked before it is read: a manifest is written
    in stages (curate run fills it in as it goes), and readers ask only for what they use."""

    def __init__(self, data: dict[str, Any] | None = None, source: str = "manifest.json"):
        super().__init__(data or {})
        self.source = source

    @classmethod
    def of(cls, m: dict[str, Any], source: str) -> Manifest:
        """`m` as a Manifest (itself when it is one already)."""
        return m if isinstance(m, Manifest) else cls(m, source)

    def _get(self, key: str, kind: type | tuple[type, ...], what: str, default: Any = _MISSING) -> Any:
        if key not in self:
            if default is _MISSING:
                raise ValueError(f"{self.source}: the manifest has no {key!r}")
            return default
        v = self[key]
        if not isinstance(v, kind):
            raise ValueError(f"{self.source}: the manifest's {key!r} should be {what}, not {v!r:.200}")
        return v

    @property
    def state(self) -> str:
        """One of RUN_STATES."""
        v = self._get("state", str, "a run state")
        if v not in RUN_STATES:
            raise ValueError(f"{self.source}: the manifest's 'state' {v!r} is not one of {RUN_STATES}")
        return v

    @property
    def spec(self) -> dict[str, Any]:
        """The resolved pipeline spec, as JSON (PipelineSpec.model_validate makes it a spec again)."""
        return self._get("spec", dict, "an object (the pipeline spec)")

    @property
    def counts(self) -> RunTotals | None:
        """The run totals; None while the run has not summed its shards (manifest.new writes {})."""
        v = self._get("counts", dict, "an object (the run totals)")
        return RunTotals.from_json(v, self.source) if v else None

    @property
    def shards(self) -> dict[str, dict[str, Any]]:
        """{shard: its counts as the run last saw them}."""
        v = self._get("shards", dict, "an object of {shard: counts}")
        for k, entry in v.items():
            if not isinstance(entry, dict):
                raise ValueError(
                    f"{self.source}: the manifest's 'shards'[{k!r}] should be an object, not {entry!r:.200}"
                )
        return v

    @property
    def failed_shards(self) -> dict[str, str]:
        """{shard: its error} of the shards that failed."""
        v = self._get("failed_shards", dict, "an object of {shard: error}")
        if not all(isinstance(e, str) for e in v.values()):
            raise ValueError(f"{self.source}: the manifest's 'failed_shards' should map shards to error texts")
        return v

    @property
    def unaccounted_rows(self) -> dict[str, int | str]:
        """{failed shard: its rows (from the parquet footer), or "unknown"}. Written with the run
        totals, once the shards are done: absent, it is {} only where no shard failed (nothing is
        unaccounted); a manifest with failed shards and no count of their rows fails."""
        if "unaccounted_rows" not in self and not self.failed_shards:
            return {}
        v = self._get("unaccounted_rows", dict, "an object of {shard: rows or 'unknown'}")
        for k, n in v.items():
            if n != "unknown" and not (_is_int(n) and n >= 0):
                raise ValueError(f"{self.source}: the manifest's 'unaccounted_rows'[{k!r}] is {n!r}")
        return v

    @property
    def selections(self) -> list[str]:
        """Names of the selections written in this run directory."""
        v = self._get("selections", list, "a list of selection names")
        if not all(isinstance(s, str) for s in v):
            raise ValueError(f"{self.source}: the manifest's 'selections' should be a list of names, not {v!r:.200}")
        return v

    @property
    def selection_specs(self) -> dict[str, dict[str, Any]]:
        """{selection: the rules it was made with}. Absent in manifests written before the rules
        were recorded (and in hand-made ones): {}, i.e. no rules recorded."""
        v = self._get("selection_specs", dict, "an object of {selection: rules}", default={})
        for k, rules in v.items():
            if not isinstance(rules, dict):
                raise ValueError(f"{self.source}: the manifest's 'selection_specs'[{k!r}] should be an object")
        return v

    @property
    def outputs(self) -> dict[str, Any]:
        """{"files": {relative path: {bytes, version, sha256}}, "recorded_at": time or None}.
        Absent in manifests written before checksums were recorded (and in hand-made ones): no
        files recorded, so every file is read afresh."""
        v = self._get("outputs", dict, "an object", default={"files": {}, "recorded_at": None})
        if not isinstance(v.get("files"), dict) or "recorded_at" not in v:
            raise ValueError(f"{self.source}: the manifest's 'outputs' should hold 'files' and 'recorded_at'")
        return v
