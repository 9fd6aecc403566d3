"""Corrupt shards among good ones: a clear error naming each, the other shards complete, the run
exits non-zero, and the manifest, selection.json, report.json and report.html list the failed
shards with their rows as unaccounted: the count from the parquet footer when the footer is
readable (a corrupt data page), "unknown" when it is not (not parquet at all)."""

import io
import json

import polars as pl
import pyarrow.parquet as pq
from typer.testing import CliRunner

from curate.cli import app


def corrupt_data_page(df: pl.DataFrame) -> bytes:
    """A parquet file whose footer is intact (it says how many rows) and whose first column's
    compressed data page is garbled, so reading the rows fails."""
    buf = io.BytesIO()
    df.write_parquet(buf, compression="zstd")
    data = bytearray(buf.getvalue())
    col = pq.ParquetFile(io.BytesIO(bytes(data))).metadata.row_group(0).column(0)
    start = col.dictionary_page_offset or col.data_page_offset
    mid = start + col.total_compressed_size // 2
    for i in range(mid, mid + 16):
        data[i] ^= 0x5A
    assert pq.ParquetFile(io.BytesIO(bytes(data))).metadata.num_rows == df.height
    return bytes(data)


def test_corrupt_shards_fail_loudly_and_alone(tmp_path, laion_sample, ray_session):
    src = pl.read_parquet(laion_sample).head(420)
    inp = tmp_path / "in"
    inp.mkdir()
    src.head(150).write_parquet(inp / "part-0.parquet")
    src.slice(150, 150).write_parquet(inp / "part-1.parquet")
    (inp / "part-2.parquet").write_bytes(b"PAR1" + b"not really parquet" * 50)
    (inp / "part-3.parquet").write_bytes(corrupt_data_page(src.tail(120)))
    out = tmp_path / "run"

    res = CliRunner().invoke(app, ["run", "laion_sample", "--input", str(inp), "--out", str(out)])
    assert res.exit_code == 1, res.output
    assert "part-2" in res.output and "part-3" in res.output and "not a readable parquet file" in res.output
    # the FAILED list comes first, and the reconcile line says what it covers
    assert res.output.index("FAILED") < res.output.index("counts reconcile")
    assert "counts reconcile over the 2 completed shard(s), 2 FAILED (listed above): yes" in res.output

    m = json.loads((out / "manifest.json").read_text())
    assert m["state"] == "failed"
    assert sorted(m["failed_shards"]) == ["part-2", "part-3"]
    assert "part-2.parquet" in m["failed_shards"]["part-2"] and "part-3.parquet" in m["failed_shards"]["part-3"]
    assert m["unaccounted_rows"] == {"part-2": "unknown", "part-3": 120}
    assert m["counts"]["shards_complete"] == 2 and m["counts"]["rows"] == 300

    sel = out / "selections" / "default"
    summary = json.loads((sel / "selection.json").read_text())
    assert summary["counts"]["rows"] == 300 and summary["reconciles"]
    assert summary["unaccounted_rows"] == {"part-2": "unknown", "part-3": 120}
    report = json.loads((sel / "report.json").read_text())
    assert sorted(report["meta"]["failed_shards"]) == ["part-2", "part-3"]
    assert report["meta"]["unaccounted_rows"] == {"part-2": "unknown", "part-3": 120}
    html = (sel / "report.html").read_text()
    assert "2 input shard(s) failed: 120 + unknown rows are not accounted for" in html
    assert '<td class="val">part-3</td><td>120</td>' in html.replace(' class="n"', "")
