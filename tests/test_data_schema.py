"""The canonical tables as one Parquet file or a directory of parts: every reader, both forms."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tiger_ray.data.schema import (SEQUENCES_SCHEMA, count_list_values, count_rows, iter_batches,
                                   parquet_files, read_dataset, read_items, read_sequences)


def sequences(first: int, n: int, length: int = 3) -> pa.Table:
    users = np.arange(first, first + n, dtype=np.int64)
    items = [list(range(u, u + length)) for u in users]
    return pa.table({"user_id": pa.array(users), "item_ids": pa.array(items, pa.list_(pa.int64()))},
                    schema=SEQUENCES_SCHEMA)


@pytest.fixture(params=["file", "parts"])
def table_path(request, tmp_path):
    """The same 25 users, lengths 3..7, as one file or as 3 parts (+ a writer's temp file)."""
    tables = [sequences(1, 10, 3), sequences(11, 10, 5), sequences(21, 5, 7)]
    if request.param == "file":
        path = tmp_path / "sequences.parquet"
        pq.write_table(pa.concat_tables(tables), path, row_group_size=4)
        return path
    path = tmp_path / "sequences.parquet"
    path.mkdir()
    for i, table in enumerate(tables):
        pq.write_table(table, path / f"part-{i:05d}-0.parquet", row_group_size=4)
    (path / ".part-00003-0.parquet.tmp-1234").write_bytes(b"half-written")  # must be ignored
    return path


def test_count_rows_and_values_come_from_the_footers(table_path):
    assert count_rows(table_path) == 25
    assert count_list_values(table_path, "item_ids") == 10 * 3 + 10 * 5 + 5 * 7
    with pytest.raises(ValueError, match="no list column 'nope'"):
        count_list_values(table_path, "nope")


def test_iter_batches_is_bounded_and_in_id_order(table_path):
    batches = list(iter_batches(table_path, ["user_id"], batch_rows=3))
    assert all(b.num_rows <= 3 for b in batches) and len(batches) >= 9
    assert batches[0].schema.names == ["user_id"]
    users = np.concatenate([b.column("user_id").to_numpy() for b in batches])
    np.testing.assert_array_equal(users, np.arange(1, 26))


def test_read_sequences_and_items_load_both_forms(table_path):
    seqs = read_sequences(table_path)
    np.testing.assert_array_equal(seqs.user_ids, np.arange(1, 26))
    np.testing.assert_array_equal(seqs[10], [11, 12, 13, 14, 15])
    np.testing.assert_array_equal(seqs.lengths, [3] * 10 + [5] * 10 + [7] * 5)
    assert read_items(table_path, columns=["user_id"]).num_rows == 25


def test_parts_are_read_in_name_order_not_creation_order(tmp_path):
    path = tmp_path / "t.parquet"
    path.mkdir()
    pq.write_table(sequences(11, 5), path / "part-00001-0.parquet")  # written first
    pq.write_table(sequences(1, 10), path / "part-00000-0.parquet")
    assert [p.name for p in parquet_files(path)] == ["part-00000-0.parquet", "part-00001-0.parquet"]
    np.testing.assert_array_equal(read_sequences(path).user_ids, np.arange(1, 16))


def test_missing_and_empty_paths_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.parquet does not exist"):
        count_rows(tmp_path / "nothing.parquet")
    (tmp_path / "empty.parquet").mkdir()
    with pytest.raises(ValueError, match="empty.parquet: a directory without Parquet parts"):
        list(iter_batches(tmp_path / "empty.parquet"))


@pytest.mark.ray
def test_read_dataset_streams_both_forms(table_path, ray_local):
    ds = read_dataset(table_path, columns=["user_id"])
    assert ds.count() == 25
    assert sorted(ds.to_pandas()["user_id"]) == list(range(1, 26))
    assert ds.schema().names == ["user_id"]
