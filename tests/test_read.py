import hashlib

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curate.config import InputConfig
from curate.stages.read import ShardReadError, list_shards, read_shard


def _write(path, **cols):
    pq.write_table(pa.table(cols), path)
    return str(path)


def test_laion_layout_gets_stable_datacomp_style_uids(tmp_path):
    p = _write(
        tmp_path / "a.parquet",
        URL=["http://x.com/1.jpg", None],
        TEXT=["a cat", "a dog"],
        WIDTH=[10, 20],
        HEIGHT=[30, 40],
    )
    t = read_shard(p, InputConfig(paths=[p]))
    assert t.column("shard").to_pylist() == ["a", "a"]
    assert t.column("row").to_pylist() == [0, 1]
    expected = hashlib.md5(b"http://x.com/1.jpg\x00a cat").hexdigest()
    assert t.column("uid").to_pylist()[0] == expected
    assert len(t.column("uid").to_pylist()[1]) == 32
    assert t.column("original_width").to_pylist() == [10, 20]
    # same input, same uids: reruns and other machines agree
    assert read_shard(p, InputConfig(paths=[p])).column("uid").equals(t.column("uid"))


def test_datacomp_layout_keeps_its_uids(tmp_path):
    uid = "0123456789abcdef0123456789ABCDEF"
    p = _write(
        tmp_path / "d.parquet",
        uid=[uid],
        url=["http://x/1.jpg"],
        text=["t"],
        original_width=[300],
        original_height=[200],
        clip_l14_similarity_score=[0.31],
    )
    t = read_shard(p, InputConfig(paths=[p]), extra_columns=("clip_l14_similarity_score",))
    assert t.column("uid").to_pylist() == [uid.lower()]
    assert t.column("clip_l14_similarity_score").to_pylist() == pytest.approx([0.31])


def test_missing_column_names_the_file_and_the_column(tmp_path):
    p = _write(tmp_path / "bad.parquet", URL=["http://x/1.jpg"], CAPTION=["t"])
    with pytest.raises(ShardReadError) as e:
        read_shard(p, InputConfig(paths=[p], layout="laion"))
    assert "bad.parquet" in str(e.value) and "'TEXT'" in str(e.value)


def test_unknown_layout_lists_the_columns_found(tmp_path):
    p = _write(tmp_path / "odd.parquet", link=["http://x/1.jpg"], alt=["t"])
    with pytest.raises(ShardReadError, match=r"odd.parquet.*\['link', 'alt'\]"):
        read_shard(p, InputConfig(paths=[p]))


def test_custom_layout_maps_named_columns(tmp_path):
    p = _write(tmp_path / "c.parquet", link=["http://x/1.jpg"], alt=["t"])
    t = read_shard(p, InputConfig(paths=[p], layout="custom", url_column="link", caption_column="alt"))
    assert t.column("url").to_pylist() == ["http://x/1.jpg"] and t.column("caption").to_pylist() == ["t"]


def test_corrupt_parquet_is_a_clear_error_naming_the_file(tmp_path):
    p = tmp_path / "broken.parquet"
    p.write_bytes(b"PAR1" + b"\x00garbage" * 100)
    with pytest.raises(ShardReadError, match="broken.parquet.*not a readable parquet file"):
        read_shard(str(p), InputConfig(paths=[str(p)]))


def test_caption_of_the_wrong_type_is_named(tmp_path):
    p = _write(tmp_path / "t.parquet", URL=["http://x/1.jpg"], TEXT=[5])
    with pytest.raises(ShardReadError, match="'TEXT' should hold text"):
        read_shard(p, InputConfig(paths=[p]))


def test_keep_column_that_does_not_exist_is_named(tmp_path):
    p = _write(tmp_path / "k.parquet", URL=["u"], TEXT=["t"])
    with pytest.raises(ShardReadError, match="missing column 'source'"):
        read_shard(p, InputConfig(paths=[p], keep_columns=["source"]))


def test_shard_listing_refuses_two_shards_with_one_name(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    _write(tmp_path / "a" / "part-0.parquet", URL=["u"], TEXT=["t"])
    _write(tmp_path / "b" / "part-0.parquet", URL=["u"], TEXT=["t"])
    with pytest.raises(ShardReadError, match="share the name 'part-0'"):
        list_shards(InputConfig(paths=[str(tmp_path / "a"), str(tmp_path / "b")]))


def test_missing_input_path_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        list_shards(InputConfig(paths=[str(tmp_path / "nowhere")]))
