"""The run directory's typed records (curate/records.py): completion markers and the manifest read
as values of the right type, or fail naming the file and the key, never as a silent 0 or "—";
and the files on disk keep the keys that run directories already hold."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest

from curate import accounting, manifest, schema, store
from curate.records import Manifest, RunTotals, ShardMarker
from curate.shard_jobs import finish_shard

# a marker as finish_shard writes one today for a scored shard (prepare counts + scoring counts)
CURRENT = {
    "shard": "part-0",
    "rows": 5,
    "scored": 3,
    "fetch_status": {"ok": 3, "not_attempted": 1, "http_404": 1},
    "rows_read": 7,
    "forgotten": 2,
    "fetch_attempted": 4,
    "fetch_ok": 3,
    "prepare_s": 1.25,
    "scored_now": 3,
    "score_s": 0.5,
    "finished_at": "2026-11-30T08:00:00Z",
}
# the first curate's marker of a scored shard: no rows_read, forgotten, fetch counts nor prepare_s
OLD = {
    "shard": "part-1",
    "rows": 4,
    "scored": 2,
    "fetch_status": {"ok": 2, "not_attempted": 2},
    "scored_now": 2,
    "score_s": 0.25,
    "finished_at": "2026-11-22T10:00:00Z",
}


def _write_marker(run: Path, data: dict) -> Path:
    p = run / store.ANNOTATIONS / f"{data.get('shard', 'part-0')}{store.MARKER_SUFFIX}"
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(data))
    return p


def test_marker_round_trip_keeps_the_keys_on_disk(tmp_path):
    mk = ShardMarker.from_json(CURRENT, "x.done")
    assert mk.to_json() == CURRENT
    assert ShardMarker.from_json(mk.to_json(), "x.done") == mk
    store.write_marker(str(tmp_path), mk)
    assert json.loads(Path(store.marker_path(str(tmp_path), "part-0")).read_text()) == CURRENT
    assert store.read_marker(str(tmp_path), "part-0") == mk


def test_old_marker_reads_with_the_documented_defaults(tmp_path):
    _write_marker(tmp_path, OLD)
    mk = store.read_marker(str(tmp_path), "part-1")
    assert (mk.rows_read, mk.forgotten) == (4, 0)  # before curate forget: every row read is in the file
    assert mk.fetch_attempted is None and mk.fetch_ok is None and mk.prepare_s is None  # not recorded
    assert mk.to_json() == {**OLD, "rows_read": 4, "forgotten": 0}  # nothing invented but the exact counts
    assert accounting.marker_counts(str(tmp_path), "part-1") == {"rows_read": 4, "forgotten": 0}


def test_run_totals_sum_the_markers_as_the_runner_did(tmp_path):
    _write_marker(tmp_path, CURRENT)
    _write_marker(tmp_path, OLD)
    totals = accounting.run_totals(str(tmp_path), ["part-0", "part-1"])
    assert totals.to_json() == {
        "shards_complete": 2,
        "rows": 9,
        "forgotten": 2,
        "fetch_attempted": 4,  # the old marker recorded none: it adds 0
        "fetch_ok": 3,
        "scored": 5,
        "fetch_status": {"ok": 5, "not_attempted": 3, "http_404": 1},
    }
    assert RunTotals.from_json(totals.to_json(), "m.json") == totals


DROP = object()  # the key is left out


@pytest.mark.parametrize(
    "change, key",
    [
        ({"scored": DROP}, "scored"),
        ({"fetch_status": DROP}, "fetch_status"),
        ({"rows": "5"}, "rows"),
        ({"forgotten": -1}, "forgotten"),
        ({"fetch_status": {"ok": 2.5}}, "fetch_status"),
        ({"fetched_ok": 3}, "fetched_ok"),  # a renamed key is unknown, not a silent default
    ],
)
def test_a_bad_marker_fails_naming_the_file_and_the_key(tmp_path, change, key):
    data = {k: v for k, v in {**CURRENT, **change}.items() if v is not DROP}
    path = _write_marker(tmp_path, data)
    with pytest.raises(ValueError) as e:
        store.read_marker(str(tmp_path), "part-0")
    assert str(path) in str(e.value) and repr(key) in str(e.value)


def test_unreadable_or_misplaced_marker_fails_naming_the_file(tmp_path):
    path = _write_marker(tmp_path, CURRENT)
    path.write_text('{"shard": ')
    with pytest.raises(ValueError, match="not a readable completion marker") as e:
        store.read_marker(str(tmp_path), "part-0")
    assert str(path) in str(e.value)
    other = tmp_path / store.ANNOTATIONS / f"part-9{store.MARKER_SUFFIX}"
    other.write_text(json.dumps(CURRENT))  # part-0's marker copied beside part-9's files
    with pytest.raises(ValueError, match="for shard 'part-0', not 'part-9'"):
        store.read_marker(str(tmp_path), "part-9")


def test_a_bare_marker_is_accepted_by_the_selection_accounting_only(tmp_path):
    _write_marker(tmp_path, {})
    with pytest.raises(ValueError, match="has no 'fetch_status', 'finished_at', 'rows', 'scored', 'shard'"):
        store.read_marker(str(tmp_path), "part-0")
    assert store.read_marker_or_bare(str(tmp_path), "part-0") is None
    report = {"shards": [{"shard": "part-0", "rows_in": 6}]}
    per = accounting.reconcile_report(report, str(tmp_path), ["part-0"])
    assert per == {"part-0": {"rows_read": 6, "forgotten": 0}} and "problems" not in report


def _annotations(rows: int) -> pl.DataFrame:
    return pl.DataFrame(
        {
            schema.SHARD: ["part-0"] * rows,
            schema.ROW: list(range(rows)),
            schema.FETCH_STATUS: ["ok"] * (rows - 1) + ["not_attempted"],
            schema.CLIP_SCORE: [0.3] * (rows - 1) + [None],
        },
        schema_overrides={schema.CLIP_SCORE: pl.Float32},
    )


def test_finish_shard_writes_a_typed_marker_with_todays_keys(tmp_path):
    counts = {"rows": 4, "rows_read": 5, "forgotten": 1, "fetch_attempted": 3, "fetch_ok": 3, "prepare_s": 0.5}
    finish_shard(str(tmp_path), "part-0", _annotations(4), [], counts)
    data = json.loads(Path(store.marker_path(str(tmp_path), "part-0")).read_text())
    expected = {"shard", "rows", "scored", "fetch_status", "finished_at", *counts}
    assert set(data) == expected
    assert data["scored"] == 3 and data["fetch_status"] == {"ok": 3, "not_attempted": 1}
    assert store.read_marker(str(tmp_path), "part-0").to_json() == data


def test_finish_shard_refuses_an_unknown_count_before_writing(tmp_path):
    with pytest.raises(ValueError, match="unknown key.*'fetched_ok'"):
        finish_shard(str(tmp_path), "part-0", _annotations(3), [], {"rows_read": 3, "forgotten": 0, "fetched_ok": 2})
    assert not (tmp_path / store.ANNOTATIONS).exists()  # neither the annotation file nor a marker


ZERO_TOTALS = {
    "shards_complete": 0,
    "rows": 0,
    "forgotten": 0,
    "fetch_attempted": 0,
    "fetch_ok": 0,
    "scored": 0,
    "fetch_status": {},
}


def _manifest_dir(tmp_path: Path, **keys) -> Path:
    m = {"format": 1, "spec": {}, "state": "complete", "counts": {}, "shards": {}, "failed_shards": {}}
    m.update(keys)
    (tmp_path / store.MANIFEST).write_text(json.dumps(m))
    return tmp_path


@pytest.mark.parametrize(
    "keys, read, message",
    [
        ({"selections": "default"}, "selections", "'selections' should be a list"),
        ({"counts": {"rows": 3}}, "counts", "'counts' has no 'fetch_attempted'"),
        ({"counts": {**ZERO_TOTALS, "rows": "3"}}, "counts", "'rows' should be a non-negative integer"),
        ({"state": "done"}, "state", "'state' 'done' is not one of"),
        ({"failed_shards": {"part-3": "boom"}}, "unaccounted_rows", "has no 'unaccounted_rows'"),
        ({"outputs": {"files": []}}, "outputs", "'outputs' should hold 'files' and 'recorded_at'"),
        ({}, "selections", "has no 'selections'"),
    ],
)
def test_a_corrupted_manifest_key_fails_loudly(tmp_path, keys, read, message):
    run = _manifest_dir(tmp_path, **keys)
    m = manifest.read(str(run))
    with pytest.raises(ValueError, match=message) as e:
        getattr(m, read)
    assert str(run / store.MANIFEST) in str(e.value)


def test_manifest_accessors_and_the_file_format(tmp_path):
    run = _manifest_dir(tmp_path, selections=["default"], unaccounted_rows={})
    text = (run / store.MANIFEST).read_text()
    m = manifest.read(str(run))
    assert isinstance(m, Manifest) and m.state == "complete" and m.selections == ["default"]
    assert m.counts is None  # the run has not summed its shards
    assert m.failed_shards == {} and m.unaccounted_rows == {} and m.shards == {}
    # written by an older curate: no selection rules nor checksums recorded, said so explicitly
    assert m.selection_specs == {} and m.outputs == {"files": {}, "recorded_at": None}
    manifest.write(str(run), m)
    assert json.loads((run / store.MANIFEST).read_text()) == json.loads(text)  # the same JSON object
