"""The Ray Data engine of `tiger prepare` (--engine ray): inputs too large for one process.

It writes the same rows as the in-memory engine (prepare.py + catalog.py) on the same input, and
no step gathers users, items or interactions into the driver; the driver plans and receives
counts, a few per-file totals and at most a handful of example rows for an error message:

1. parse: one Ray task per input file streams its lines through the parsers of
   sequences_format.py; rows carry (file, line, number within the file). Per-file row counts (a
   groupby over the few files) turn those into input order: users 1..U in file then line order.
   An interaction's position is user * (longest sequence + 1) + index, so sorting positions walks
   the users in order, each oldest item first.
2. checks, as the in-memory engine makes them: a repeated user or item (groupby counts, then the
   earliest repeat), too-short users, item ids without a metadata row.
3. --k-core K: interactions hash-partitioned by item, then by user; each bucket task counts its
   keys (a groupby within the bucket, which holds all rows of its keys) and drops those under K;
   repeated until the interaction count stops falling.
4. dense ids: a groupby gives each item its first position, a sort orders the items by it, and an
   item's id is its row number in that order: the first id of a sorted part is the row count of
   the parts before it, read from Parquet footers.
5. lookups (ids into sequences, metadata onto ids) are hash joins over key ranges: both sides are
   written into B buckets by a stable hash of the key and one task joins each bucket in pyarrow,
   so no task holds more than about 1/B of either side.
6. items and sequences are sorted by id and written as Parquet parts in id order; the statistics
   come from aggregates (a histogram of sequence lengths, per-field counts).

Intermediate tables are Parquet under a hidden scratch directory in the run directory, on the
same filesystem the workers write to; it is removed at the end, failed or not. The outputs are
built under temporary names and renamed into place only when all are complete.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import shutil
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from tiger_ray import atomic
from tiger_ray.data.catalog import MAX_EXAMPLES, missing_metadata_error, short_users_error
from tiger_ray.data.lines import iter_lines, where
from tiger_ray.data.prepare_config import (PrepareConfig, choose_engine, describe_run,
                                           effective_k_core, input_parts, input_specs,
                                           stale_stages, warn_stale)
from tiger_ray.data.ray_parts import data_context, write_parts
from tiger_ray.data.schema import ITEMS_SCHEMA, SEQUENCES_SCHEMA, parquet_files
from tiger_ray.data.sequences_format import (parse_item_line, parse_sequence_line,
                                             repeated_item_error, repeated_user_error)
from tiger_ray.data.split import MIN_SEQUENCE_LENGTH
from tiger_ray.data.stats import COVERAGE_FIELDS, field_coverage
from tiger_ray.runs import RunDir

log = logging.getLogger(__name__)

BUCKET_BYTES = 64 * 1024 ** 2  # compressed input bytes per join bucket (~10x that in memory)
BLOCK_ROWS = 65_536  # rows a parse task yields at a time

# Columns every parsed table starts with: where the row came from.
_SOURCE_FIELDS = [pa.field("file", pa.int32()), pa.field("line", pa.int64()),
                  pa.field("local", pa.int64())]
USERS_SCHEMA = pa.schema([*_SOURCE_FIELDS, pa.field("user", pa.string()),
                          pa.field("items", pa.list_(pa.string())), pa.field("n", pa.int64())])
META_SCHEMA = pa.schema([*_SOURCE_FIELDS, pa.field("key", pa.string()),
                         *[ITEMS_SCHEMA.field(name) for name in ITEMS_SCHEMA.names[1:]]])


class InputError(ValueError):
    """Bad input found inside a Ray task; the driver re-raises it as a plain ValueError."""


# ------------------------------------------------------------------------------ parsing


def _user_row(line: str, at: str) -> dict:
    user, items = parse_sequence_line(line, at)
    return {"user": user, "items": items, "n": len(items)}


def _item_row(line: str, at: str) -> dict:
    record = parse_item_line(line, at)
    return {"key": record.key, "asin": record.asin if record.asin is not None else record.key,
            "title": record.title, "brand": record.brand, "categories": record.categories,
            "price": record.price, "text": record.text()}


def _parse_files(files: list[str], parse_row: Callable[[str, str], dict], schema: pa.Schema):
    """A map_batches function: a batch of file indices -> the rows of those files, in blocks."""
    def parse(batch: dict[str, np.ndarray]):
        for index in batch["id"]:
            path = files[int(index)]
            columns: dict[str, list] = {name: [] for name in schema.names}
            try:
                for local, (lineno, line) in enumerate(iter_lines(path, progress=False)):
                    row = parse_row(line, where(path, lineno))
                    row.update(file=int(index), line=lineno, local=local)
                    for name, values in columns.items():
                        values.append(row[name])
                    if len(columns["line"]) == BLOCK_ROWS:
                        yield pa.table(columns, schema=schema)
                        columns = {name: [] for name in schema.names}
            except ValueError as err:
                raise InputError(str(err)) from None
            if columns["line"]:
                yield pa.table(columns, schema=schema)
    return parse


# ------------------------------------------------------------------------------ helpers


def _where(ds, predicate: Callable[[pa.Table], pa.Array]):
    """Rows of ``ds`` for which ``predicate(block)`` is true (vectorised, in the workers)."""
    return ds.map_batches(lambda block: block.filter(predicate(block)), batch_format="pyarrow",
                          batch_size=None)


def _with_columns(block: pa.Table, **columns) -> pa.Table:
    for name, values in columns.items():
        block = block.append_column(name, pa.array(values, pa.int64()))
    return block


def _bucket_of(column: pa.ChunkedArray, buckets: int) -> np.ndarray:
    """A stable hash of each key mod ``buckets`` (the same in every process, unlike hash())."""
    import pandas as pd

    if pa.types.is_integer(column.type):
        return column.to_numpy() % buckets
    values = column.to_numpy(zero_copy_only=False).astype(object)
    return (pd.util.hash_array(values) % np.uint64(buckets)).astype(np.int64)


def _join_tables(left: pa.Table, right: pa.Table, left_on: str, right_on: str,
                 how: str) -> pa.Table:
    """pyarrow's hash join on index columns, then ``take``: joins tables with list columns too."""
    index = pa.table({"k": left[left_on], "l": np.arange(left.num_rows)}).join(
        pa.table({"k": right[right_on], "r": np.arange(right.num_rows)}), "k", join_type=how)
    taken = left.take(index["l"])
    if how == "left anti":
        return taken
    extra = right.drop_columns([right_on]).take(index["r"])  # null index -> null row (outer)
    return pa.Table.from_arrays(taken.columns + extra.columns, names=taken.column_names + extra.column_names)


def _read_bucket(directory: Path, bucket: int) -> pa.Table | None:
    folder = directory / f"bucket={bucket}"
    return pads.dataset(str(folder), format="parquet").to_table() if folder.is_dir() else None


def _input_error(err: BaseException) -> InputError | None:
    """The InputError a Ray task raised, found through RayTaskError's ``cause`` and chains."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        cause = getattr(err, "cause", None)
        if isinstance(err, InputError) and not isinstance(cause, BaseException):
            return err
        err = cause if isinstance(cause, BaseException) else err.__cause__
    return None


class _Stream:
    """The Ray Data steps of one run, with their scratch directory and join bucket count."""

    def __init__(self, scratch: Path, buckets: int):
        self.scratch = scratch
        self.buckets = buckets
        self._count = 0

    def _new_dir(self, name: str) -> Path:
        self._count += 1
        return self.scratch / f"{self._count:03d}-{name}"

    def save(self, ds, name: str):
        """Write ``ds`` to scratch and read it back: later steps read it instead of recomputing
        its whole lineage. None if it has no rows."""
        import ray.data

        directory = self._new_dir(name)
        ds.write_parquet(str(directory))
        if not directory.is_dir() or not any(directory.glob("*.parquet")):
            return None
        return ray.data.read_parquet(str(directory))

    def bucketed(self, ds, key: str, name: str) -> Path:
        """``ds`` written into bucket=<b>/ folders by the stable hash of ``key``."""
        buckets = self.buckets
        directory = self._new_dir(name)

        def tag(block: pa.Table) -> pa.Table:
            return block.append_column("bucket", pa.array(_bucket_of(block[key], buckets)))

        ds.map_batches(tag, batch_format="pyarrow", batch_size=None).write_parquet(
            str(directory), partition_cols=["bucket"])
        return directory

    def per_bucket(self, directory: Path, fn: Callable[[pa.Table, int], pa.Table | None]):
        """``fn(rows, bucket)`` for each bucket of a ``bucketed`` table: all rows of a key are in
        one bucket. Empty buckets and None results give no rows."""
        import ray.data

        def apply(batch: dict[str, np.ndarray]):
            for bucket in batch["id"]:
                rows = _read_bucket(directory, int(bucket))
                result = fn(rows, int(bucket)) if rows is not None else None
                if result is not None:
                    yield result

        return ray.data.range(self.buckets, override_num_blocks=self.buckets).map_batches(
            apply, batch_size=1, batch_format="numpy")

    def join(self, left: Path, right: Path, left_on: str, right_on: str, how: str):
        """Bucket by bucket join of two ``bucketed`` tables (how: "inner", "left anti")."""
        def join_bucket(left_rows: pa.Table, bucket: int) -> pa.Table | None:
            right_rows = _read_bucket(right, bucket)
            if right_rows is None:
                return left_rows if how == "left anti" else None
            return _join_tables(left_rows, right_rows, left_on, right_on, how)

        return self.per_bucket(left, join_bucket)

    def dense_rank(self, ds, order: str, out: str, start: int = 0):
        """``ds`` plus column ``out`` = start + 1-based row number in ``order`` (unique values).

        Sorted, written in parts; a part's first number is the row count of the parts before it
        (Parquet footers), so no task needs rows of another."""
        import ray.data

        directory = self._new_dir(f"rank-{out}")
        ds.sort(order).write_parquet(str(directory))
        parts = []
        for path in parquet_files(directory) if directory.is_dir() else []:
            meta = pq.read_metadata(path)
            if meta.num_rows:
                column = meta.schema.to_arrow_schema().get_field_index(order)
                lows = [meta.row_group(g).column(column).statistics.min
                        for g in range(meta.num_row_groups)]
                highs = [meta.row_group(g).column(column).statistics.max
                         for g in range(meta.num_row_groups)]
                parts.append((min(lows), max(highs), str(path), meta.num_rows))
        parts.sort()
        if any(a[1] >= b[0] for a, b in zip(parts, parts[1:])):
            raise RuntimeError(f"{directory}: sorted parts overlap in {order}")  # never expected
        offsets = start + np.concatenate([[0], np.cumsum([p[3] for p in parts])]).astype(np.int64)
        files = [p[2] for p in parts]

        def number(batch: dict[str, np.ndarray]) -> pa.Table:
            tables = []
            for part in batch["id"]:
                table = pq.read_table(files[int(part)])
                table = table.take(pc.sort_indices(table[order]))
                first = offsets[int(part)]
                tables.append(_with_columns(table, **{out: np.arange(first + 1,
                                                                    first + table.num_rows + 1)}))
            return pa.concat_tables(tables)

        ranked = ray.data.range(len(files), override_num_blocks=max(len(files), 1)).map_batches(
            number, batch_size=1, batch_format="numpy") if files else None
        return ranked, int(offsets[-1] - start)

    def read(self, files: list[Path], parse_row, schema: pa.Schema, name: str):
        """Parse ``files`` in Ray tasks and number the rows 1.. in file then line order (column
        ``ord``); returns (dataset, totals of ``_block_totals`` over all rows)."""
        import ray.data

        names = [str(p) for p in files]
        parsed = self.save(ray.data.range(len(names), override_num_blocks=len(names)).map_batches(
            _parse_files(names, parse_row, schema), batch_size=1, batch_format="numpy"), name)
        if parsed is None:
            shown = names[0] if len(names) == 1 else f"{len(names)} files ({names[0]}, ...)"
            raise ValueError(f"{shown}: no rows in the input")
        # One small row per (block, file), not per input row; no shuffle needed.
        partial = parsed.map_batches(_block_totals, batch_format="pyarrow",
                                     batch_size=None).take_all()
        counts = np.zeros(len(names), dtype=np.int64)
        for row in partial:
            counts[row["file"]] += row["rows"]
        totals = {key: sum(row[key] for row in partial) for key in ("rows", "n", "short")}
        totals["longest"] = max(row["longest"] for row in partial)
        before = np.concatenate([[0], np.cumsum(counts)])[:-1]

        def number(block: pa.Table) -> pa.Table:
            ords = before[block["file"].to_numpy()] + block["local"].to_numpy() + 1
            return _with_columns(block, ord=ords)

        return parsed.map_batches(number, batch_format="pyarrow", batch_size=None), totals

    def first_repeat(self, ds, key: str) -> tuple[dict, dict] | None:
        """The earliest row whose ``key`` came before (where reading in order stops) and that
        key's first row, or None when every key is unique."""
        from ray.data.aggregate import Count, Min

        counts = ds.groupby(key).aggregate(Count(alias_name="count"), Min("ord", alias_name="first"))
        repeated = self.save(_where(counts, lambda b: pc.greater(b["count"], 1)), "repeated")
        if repeated is None:
            return None
        rows = ds.select_columns([key, "ord", "file", "line"])
        joined = self.join(self.bucketed(rows, key, "rows"), self.bucketed(repeated, key, "repeated"),
                           key, key, "inner")
        again = _where(joined, lambda b: pc.not_equal(b["ord"], b["first"])).sort("ord").take(1)[0]
        first = _where(rows, lambda b: pc.equal(b["ord"], again["first"])).take(1)[0]
        return again, first


# ------------------------------------------------------------------------------ steps


def _check_users_unique(stream: _Stream, users, files: list[Path]) -> None:
    found = stream.first_repeat(users, "user")
    if found:
        again, first = found
        first_at = (f"line {first['line']}" if first["file"] == again["file"]
                    else where(files[first["file"]], first["line"]))
        raise repeated_user_error(where(files[again["file"]], again["line"]), again["user"],
                                  first_at)


def _check_items_unique(stream: _Stream, meta, files: list[Path]) -> None:
    found = stream.first_repeat(meta, "key")
    if found:
        again, first = found
        raise repeated_item_error(where(files[again["file"]], again["line"]), again["key"],
                                  where(files[first["file"]], first["line"]))


def _block_totals(block: pa.Table) -> pa.Table:
    """Per file in a block of parsed rows: rows, and for users their items (n), the longest
    sequence and how many are too short for the leave-one-out split."""
    n = block["n"] if "n" in block.column_names else pa.array(np.zeros(block.num_rows, np.int64))
    grouped = pa.table({"file": block["file"], "n": n,
                        "short": pc.cast(pc.less(n, MIN_SEQUENCE_LENGTH), pa.int64())})
    totals = grouped.group_by("file").aggregate([("file", "count"), ("n", "sum"), ("n", "max"),
                                                 ("short", "sum")])
    return totals.rename_columns({"file_count": "rows", "n_sum": "n", "n_max": "longest",
                                  "short_sum": "short"})


def _explode(stride: int):
    """A map_batches function: users -> one row per interaction (user_ord, pos, item)."""
    def explode(block: pa.Table) -> pa.Table:
        items = block["items"].combine_chunks()
        parent = pc.list_parent_indices(items).to_numpy()
        offsets = items.offsets.to_numpy()
        index = np.arange(len(parent)) - (offsets[parent] - offsets[0])
        user = block["ord"].to_numpy()[parent]
        return pa.table({"user_ord": user, "pos": user * stride + index, "item": items.flatten()})
    return explode


def _count_by(ds, key: str, alias: str):
    from ray.data.aggregate import Count

    return ds.groupby(key).aggregate(Count(alias_name=alias))


def _drop_below(key: str, k: int) -> Callable[[pa.Table, int], pa.Table]:
    """A per_bucket function: the rows whose ``key`` occurs at least ``k`` times (the bucket
    holds every row of its keys, so its own counts are the global ones)."""
    def drop(rows: pa.Table, bucket: int) -> pa.Table:
        counts = rows.group_by(key).aggregate([(key, "count")])
        keep = counts.filter(pc.greater_equal(counts[f"{key}_count"], k))[key]
        return rows.filter(pc.is_in(rows[key], value_set=keep.combine_chunks()))
    return drop


def _k_core(stream: _Stream, inter, k: int, interactions: int) -> tuple[object, int]:
    """The in-memory k_core_filter's passes over the interactions table; (kept rows, passes).

    A pass drops items with fewer than k interactions, then users left with fewer than k, each
    by counts grouped per hash bucket of the key. Either drop removes interactions, so a pass
    changed something exactly when the interaction count fell."""
    passes = 0
    while True:
        passes += 1
        frequent = stream.per_bucket(stream.bucketed(inter, "item", "interactions"),
                                     _drop_below("item", k))
        kept = stream.save(stream.per_bucket(stream.bucketed(frequent, "user_ord", "interactions"),
                                             _drop_below("user_ord", k)), f"k-core-{passes}")
        remaining = kept.count() if kept is not None else 0
        if remaining in (0, interactions):
            return kept, passes
        inter, interactions = kept, remaining


def _rows_of_users(users, ords: list[int]) -> dict[int, dict]:
    """The users (source columns) with these ``ord``s: a handful, for error messages."""
    wanted = pa.array(ords, pa.int64())
    rows = _where(users.select_columns(["ord", "user", "n", "file", "line"]),
                  lambda b: pc.is_in(b["ord"], value_set=wanted)).take_all()
    return {row["ord"]: row for row in rows}


def _check_lengths(lengths, total: int, users, files: list[Path]) -> None:
    short = _where(lengths, lambda b: pc.less(b["n"], MIN_SEQUENCE_LENGTH))
    count = short.count()
    if count:
        shown = short.sort("user_ord").take(MAX_EXAMPLES)
        rows = _rows_of_users(users, [row["user_ord"] for row in shown])
        raise short_users_error(count, total, [
            (rows[row["user_ord"]]["user"], row["n"],
             where(files[rows[row["user_ord"]]["file"]], rows[row["user_ord"]]["line"]))
            for row in shown])


def _check_metadata(stream: _Stream, item_ids: Path, meta: Path, stride: int, users,
                    files: list[Path]) -> None:
    missing = stream.join(item_ids, meta, "item", "key", "left anti")
    count = missing.count()
    if count:
        shown = missing.sort("first").take(MAX_EXAMPLES)
        rows = _rows_of_users(users, [row["first"] // stride for row in shown])
        raise missing_metadata_error(count, [
            (row["item"], where(files[rows[row["first"] // stride]["file"]],
                                rows[row["first"] // stride]["line"])) for row in shown])


def _collapse(block: pa.Table) -> pa.Table:
    """Interactions (user_id, pos, item_id) of whole users -> one row per user, oldest first."""
    block = block.take(pc.sort_indices(block, [("user_id", "ascending"), ("pos", "ascending")]))
    user = block["user_id"].to_numpy()
    starts = np.flatnonzero(np.r_[True, user[1:] != user[:-1]]) if len(user) else np.array([], int)
    offsets = np.r_[starts, len(user)].astype(np.int32)
    item_ids = pa.ListArray.from_arrays(pa.array(offsets), block["item_id"].combine_chunks())
    return pa.table({"user_id": pa.array(user[starts], pa.int64()), "item_ids": item_ids},
                    schema=SEQUENCES_SCHEMA)


def _to_items_schema(block: pa.Table) -> pa.Table:
    return pa.Table.from_arrays([block[name] for name in ITEMS_SCHEMA.names], schema=ITEMS_SCHEMA)


def _coverage(block: pa.Table) -> pa.Table:
    """One row per block: stats.field_coverage of its items, added up by the driver."""
    return pa.table({name: [count] for name, count in field_coverage(block).items()})


def _length_stats(histogram: list[dict], users: int, interactions: int) -> dict:
    """compute_stats' sequence_length from a histogram {n: length, users: count} (np.median's
    convention: the mean of the two middle values when the count is even)."""
    lengths = np.array(sorted(row["n"] for row in histogram), dtype=np.int64)
    counts = np.array([{r["n"]: r["users"] for r in histogram}[n] for n in lengths])
    cumulative = np.cumsum(counts)

    def at(rank: int) -> int:  # the rank-th smallest length, 0-based
        return int(lengths[np.searchsorted(cumulative, rank + 1)])

    median = (at(users // 2) if users % 2 else (at(users // 2 - 1) + at(users // 2)) / 2)
    return {"mean": interactions / users, "median": float(median),
            "min": int(lengths[0]), "max": int(lengths[-1])}


def _prepare(stream: _Stream, config: PrepareConfig, k: int, sequence_files: list[Path],
             item_files: list[Path], items_out: Path, sequences_out: Path) -> dict:
    from ray.data.aggregate import Min

    users, totals = stream.read(sequence_files, _user_row, USERS_SCHEMA, "users")
    input_users, input_interactions = int(totals["rows"]), int(totals["n"])
    _check_users_unique(stream, users, sequence_files)
    stride = int(totals["longest"]) + 1  # positions: user * stride + index, in input order
    inter = users.map_batches(_explode(stride), batch_format="pyarrow", batch_size=None)

    k_core_report, kept_users, lengths = None, input_users, None
    if k > 1:
        inter, passes = _k_core(stream, inter, k, input_interactions)
        lengths = (stream.save(_count_by(inter, "user_ord", "n"), "lengths") if inter is not None
                   else None)
        kept_users = lengths.count() if lengths is not None else 0
        kept_interactions = lengths.sum("n") if lengths is not None else 0
        k_core_report = {"k": k, "passes": passes, "users_removed": input_users - kept_users,
                         "interactions_removed": input_interactions - kept_interactions}
        log.info("%d-core: %d passes, removed %d users and %d interactions", k, passes,
                 k_core_report["users_removed"], k_core_report["interactions_removed"])
    meta, meta_totals = stream.read(item_files, _item_row, META_SCHEMA, "metadata")
    _check_items_unique(stream, meta, item_files)
    if not kept_users:
        raise ValueError("no user sequences left to prepare")
    if lengths is None:
        lengths = users.select_columns(["ord", "n"]).rename_columns({"ord": "user_ord"})
    # The read counted short users; a k-core of at least the minimum leaves none.
    if (k > 1 and k < MIN_SEQUENCE_LENGTH) or (k <= 1 and totals["short"]):
        _check_lengths(lengths, kept_users, users, sequence_files)

    # Dense ids: items in order of first appearance, then (--keep-cold-items) metadata order.
    firsts = inter.groupby("item").aggregate(Min("pos", alias_name="first"))
    item_ids, interacted = stream.dense_rank(firsts, "first", "item_id")
    id_buckets = stream.bucketed(item_ids, "item", "item-ids")
    meta_buckets = stream.bucketed(meta, "key", "metadata")
    _check_metadata(stream, id_buckets, meta_buckets, stride, users, sequence_files)

    # Both sides of the union below need the same columns in the same order.
    items = stream.join(meta_buckets, id_buckets, "key", "item", "inner").select_columns(
        ["item_id", *ITEMS_SCHEMA.names[1:]])
    metadata_rows = int(meta_totals["rows"])
    cold = 0
    if config.keep_cold_items:
        cold_rows = stream.save(stream.join(meta_buckets, id_buckets, "key", "item", "left anti"),
                                "cold-items")
        if cold_rows is not None:
            cold_ids, cold = stream.dense_rank(cold_rows, "ord", "item_id", start=interacted)
            cold_ids = cold_ids.select_columns(["item_id", *ITEMS_SCHEMA.names[1:]])
            items = items.union(cold_ids)
    write_parts(items.sort("item_id").map_batches(_to_items_schema, batch_format="pyarrow",
                                                  batch_size=None), items_out)

    # Sequences: every interaction's item id looked up by item, users renumbered when the
    # k-core removed some (1..U' in input order), then one row per user.
    inter_ids = stream.join(stream.bucketed(inter, "item", "interactions"), id_buckets, "item",
                            "item", "inner")
    if kept_users == input_users:
        inter_ids = inter_ids.map_batches(
            lambda b: b.append_column("user_id", b["user_ord"]), batch_format="pyarrow",
            batch_size=None)
    else:
        user_ids, _ = stream.dense_rank(lengths.select_columns(["user_ord"]), "user_ord", "user_id")
        inter_ids = stream.join(stream.bucketed(inter_ids, "user_ord", "interactions"),
                                stream.bucketed(user_ids, "user_ord", "user-ids"), "user_ord",
                                "user_ord", "inner")
    # A sort puts all rows of one user_id in one block (range partitioning on the key; Ray's own
    # groupby().map_groups relies on this), so each block collapses into whole users.
    write_parts(inter_ids.select_columns(["user_id", "pos", "item_id"]).sort("user_id")
                .map_batches(_collapse, batch_format="pyarrow", batch_size=None), sequences_out)

    histogram = _count_by(lengths, "n", "users").take_all()  # one row per distinct length
    interactions = int(sum(row["n"] * row["users"] for row in histogram))
    n_items = interacted + cold
    # One row of counts per block of the written items (no shuffle), added up here.
    per_block = _read_parts(items_out).map_batches(_coverage, batch_format="pyarrow",
                                                   batch_size=None).take_all()
    stats = {
        "users": kept_users,
        "items": n_items,
        "interactions": interactions,
        "items_with_interactions": interacted,
        "sequence_length": _length_stats(histogram, kept_users, interactions),
        "density": interactions / (kept_users * n_items),
        "coverage": {name: int(sum(row[name] for row in per_block)) for name in COVERAGE_FIELDS},
    }
    return describe_run(
        config, "ray", input_specs(config), stats,
        input_counts={"users": input_users, "interactions": input_interactions},
        k_core_report=k_core_report,
        dropped=0 if config.keep_cold_items else metadata_rows - interacted)


def _read_parts(path: Path):
    import ray.data

    return ray.data.read_parquet([str(p) for p in parquet_files(path)])


def run_prepare_streaming(run: RunDir, config: PrepareConfig) -> dict:
    """`tiger prepare` through Ray Data; returns the statistics written to stats.json."""
    from ray.data.context import ShuffleStrategy

    from tiger_ray.ray_env import init_ray

    choose_engine(replace(config, engine="ray"))  # refuses the formats it cannot stream
    k = effective_k_core(config)
    sequence_spec, item_spec = input_specs(config)
    sequence_files, item_files = input_parts(sequence_spec), input_parts(item_spec)
    size = sum(p.stat().st_size for p in [*sequence_files, *item_files])
    buckets = max(1, math.ceil(size / BUCKET_BYTES))
    log.info("streaming %d sequence and %d metadata files (%d join buckets) through Ray Data",
             len(sequence_files), len(item_files), buckets)
    init_ray()
    stale = stale_stages(run)
    created_root = not run.root.exists()
    scratch = run.root / f".prepare-work-{uuid.uuid4().hex[:8]}"  # hidden: no reader lists it
    done = False
    try:
        # Sort-based shuffles: no hash-shuffle actors to start, so small runs stay fast;
        # raise_original_map_exception: a task's InputError keeps its type for _input_error.
        with data_context(preserve_order=True, raise_original_map_exception=True,
                          shuffle_strategy=ShuffleStrategy.SORT_SHUFFLE_PULL_BASED), \
                contextlib.ExitStack() as stack:
            # ExitStack renames in reverse order of entry: items, then sequences, then stats.
            stats_tmp = stack.enter_context(atomic.atomic_path(run.stats))
            sequences_tmp = stack.enter_context(atomic.atomic_path(run.sequences, is_dir=True))
            items_tmp = stack.enter_context(atomic.atomic_path(run.items, is_dir=True))
            scratch.mkdir()
            stats = _prepare(_Stream(scratch, buckets), config, k, sequence_files, item_files,
                             items_tmp, sequences_tmp)
            stats_tmp.write_text(json.dumps(stats, indent=2, sort_keys=True) + "\n",
                                 encoding="utf-8")
        done = True
    except Exception as err:
        found = _input_error(err)
        if found is not None:
            raise ValueError(str(found)) from None
        raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        if not done and created_root:
            with contextlib.suppress(OSError):
                run.root.rmdir()  # only if empty: never delete anything we did not write
    warn_stale(run, stale)
    return stats
