"""`tiger prepare` on the shared data and the generic format; item text; bad input; atomic output."""

from __future__ import annotations

import gzip
import json
import math

import numpy as np
import pyarrow.parquet as pq
import pytest

from tiger_ray import cli
from tiger_ray.data import cli as data_cli
from tiger_ray.data.item_text import clean_categories, clean_price, clean_str, item_text
from tiger_ray.data.prepare import PrepareConfig, run_prepare
from tiger_ray.data.schema import ITEMS_SCHEMA, SEQUENCES_SCHEMA, read_sequences
from tiger_ray.data.split import build_examples
from tiger_ray.runs import RunDir

# Field coverage of the shared data (see its README); Sports' 172 items whose only category path
# is empty count as having no categories.
SHARED_EXPECTED = {
    "beauty": {"users": 22_363, "items": 12_101, "interactions": 198_502,
               "coverage": {"title": 12_101, "brand": 9_983, "price": 11_516, "categories": 12_101}},
    "sports": {"users": 35_598, "items": 18_357, "interactions": 296_337,
               "coverage": {"title": 0, "brand": 18_184, "price": 0, "categories": 18_032}},
    "toys": {"users": 19_412, "items": 11_924, "interactions": 167_597,
             "coverage": {"title": 11_924, "brand": 0, "price": 0, "categories": 11_924}},
}


def tiger(argv, monkeypatch) -> int:
    """The real `tiger` entry point, with only this package's commands registered."""
    monkeypatch.setattr(cli, "COMMANDS", (data_cli,))
    return cli.main(argv)


def write_lines(path, lines):
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wt", encoding="utf-8") as handle:
        handle.write("".join(line + "\n" for line in lines))
    return path


# --- the shared Amazon 2014 data -------------------------------------------------------------

@pytest.mark.shared_data
@pytest.mark.parametrize("dataset", ["beauty", "sports", "toys"])
def test_shared_datasets_have_the_papers_statistics(dataset, shared_data_dir, tmp_path, monkeypatch,
                                                    capsys):
    run = RunDir(tmp_path / dataset)
    code = tiger(["prepare", "--dataset", dataset, "--data-dir", str(shared_data_dir),
                  "--out", str(run.root)], monkeypatch)
    assert code == 0
    printed = capsys.readouterr().out
    expected = SHARED_EXPECTED[dataset]
    assert f"{expected['users']:,}" in printed and "matches the paper's statistics" in printed

    stats = json.loads(run.stats.read_text())
    assert {k: stats[k] for k in ("users", "items", "interactions")} == {
        k: expected[k] for k in ("users", "items", "interactions")}
    assert stats["coverage"] == expected["coverage"]
    assert stats["paper"]["matches"] is True
    assert stats["items_with_interactions"] == stats["items"]

    items = pq.read_table(run.items)
    assert items.schema.equals(ITEMS_SCHEMA)
    assert items.column("item_id").to_pylist() == list(range(1, expected["items"] + 1))
    assert not any(t.startswith("Item: ") for t in items.column("text").to_pylist())
    assert pq.read_schema(run.sequences).equals(SEQUENCES_SCHEMA)
    sequences = read_sequences(run.sequences)
    assert sequences.user_ids.tolist() == list(range(1, expected["users"] + 1))
    # ids are the shared files' own ids: the first line of sequences.txt.gz comes out unchanged
    with gzip.open(shared_data_dir / dataset / "sequences.txt.gz", "rt") as handle:
        first = [int(x) for x in handle.readline().split()[1:]]
    assert sequences[0].tolist() == first
    assert sequences.lengths.min() >= 5
    assert len(build_examples(sequences, "test")) == expected["users"]


# --- item text --------------------------------------------------------------------------------

def test_item_text_lists_present_fields_in_the_papers_order():
    text = item_text("Lip Balm", 3.5, "Acme", [["Beauty", "Skin Care", "Lips"], ["Beauty", "Gifts"]],
                     fallback="X1")
    assert text == ("Title: Lip Balm; Price: $3.50; Brand: Acme; "
                    "Categories: Beauty > Skin Care > Lips, Beauty > Gifts")


def test_item_text_omits_missing_fields_and_never_writes_placeholders():
    raw_title, raw_price, raw_brand, raw_categories = None, float("nan"), "  ", [[], [None, ""]]
    text = item_text(clean_str(raw_title), clean_price(raw_price), clean_str(raw_brand),
                     clean_categories(raw_categories), fallback="B00X")
    assert text == "Item: B00X"  # nothing known: the id, never an empty text
    text = item_text(None, None, clean_str("OPI"), [], fallback="B00X")
    assert text == "Brand: OPI"
    for placeholder in ("None", "nan", "null"):
        assert clean_str(placeholder) is None
    assert clean_str("Tom &amp; Jerry \n  Set") == "Tom & Jerry Set"
    assert clean_price("$1,299.00") == 1299.0
    assert clean_price(-1) is None and clean_price(math.inf) is None and clean_price(True) is None
    assert clean_categories("Toys") == [["Toys"]]
    assert clean_categories([["A", "B"], ["A", "B"], ["C"]]) == [["A", "B"], ["C"]]


# --- the generic format ---------------------------------------------------------------------

@pytest.fixture
def generic_files(tmp_path):
    sequences = write_lines(tmp_path / "seqs.txt", [
        "alice sku-3 sku-1 sku-2 sku-1",
        "bob sku-2 sku-4 sku-3",
        "carol sku-1 sku-4 sku-5",
    ])
    items = write_lines(tmp_path / "items.jsonl.gz", [
        json.dumps({"item_id": "sku-1", "title": "Red Kite", "price": 19.5,
                    "categories": [["Toys", "Outdoor"]]}),
        json.dumps({"item_id": "sku-2", "asin": "B0002", "brand": "Acme", "price": None}),
        json.dumps({"item_id": "sku-3", "title": None, "short_text": "blue ball"}),
        json.dumps({"item_id": "sku-4", "title": "Drum", "categories": "Music"}),
        json.dumps({"asin": "sku-5", "title": "Tent", "price": "$120"}),
        json.dumps({"item_id": "sku-9", "title": "Never bought"}),
    ])
    return sequences, items


def test_generic_format_remaps_string_ids_to_dense_ids(generic_files, tmp_path):
    sequences_path, items_path = generic_files
    run = RunDir(tmp_path / "run")
    stats = run_prepare(run, PrepareConfig(format="sequences", sequences=str(sequences_path),
                                           items=str(items_path)))
    # items numbered by first appearance: sku-3, sku-1, sku-2, sku-4, sku-5
    assert read_sequences(run.sequences)[0].tolist() == [1, 2, 3, 2]
    assert read_sequences(run.sequences)[1].tolist() == [3, 4, 1]
    items = pq.read_table(run.items).to_pylist()
    assert [row["asin"] for row in items] == ["sku-3", "sku-1", "B0002", "sku-4", "sku-5"]
    assert items[0]["title"] is None and items[0]["text"] == "Title: blue ball"
    assert items[1]["text"] == "Title: Red Kite; Price: $19.50; Categories: Toys > Outdoor"
    assert items[2]["text"] == "Brand: Acme"
    assert items[3]["categories"] == [["Music"]]
    assert items[4]["price"] == 120.0
    assert stats["dataset"] == "seqs" and stats["users"] == 3 and stats["items"] == 5
    assert stats["interactions"] == 10
    assert stats["metadata_rows_without_interactions_dropped"] == 1  # sku-9
    assert stats["paper"] is None


def test_generic_format_can_keep_items_nobody_interacted_with(generic_files, tmp_path):
    sequences_path, items_path = generic_files
    run = RunDir(tmp_path / "run")
    stats = run_prepare(run, PrepareConfig(format="sequences", sequences=str(sequences_path),
                                           items=str(items_path), keep_cold_items=True))
    items = pq.read_table(run.items, columns=["item_id", "asin"]).to_pylist()
    assert items[-1] == {"item_id": 6, "asin": "sku-9"}
    assert stats["items"] == 6 and stats["items_with_interactions"] == 5


def test_k_core_filter_is_applied_on_request(tmp_path):
    sequences = write_lines(tmp_path / "s.txt", ["u1 a b c e", "u2 a b c e", "u3 a b c", "u4 a d e",
                                                  "u5 d"])
    items = write_lines(tmp_path / "i.jsonl", [json.dumps({"item_id": x}) for x in "abcde"])
    run = RunDir(tmp_path / "run")
    stats = run_prepare(run, PrepareConfig(format="sequences", sequences=str(sequences),
                                           items=str(items), k_core=3))
    # pass 1: d (2 interactions) goes, so u4 and u5 fall below 3 and go; pass 2: that leaves e
    # with 2, so e goes; pass 3: nothing changes.
    assert stats["k_core"] == {"k": 3, "passes": 3, "users_removed": 2, "interactions_removed": 6}
    assert stats["users"] == 3 and stats["items"] == 3
    assert [read_sequences(run.sequences)[u].tolist() for u in range(3)] == [[1, 2, 3]] * 3


# --- data directory resolution and missing files --------------------------------------------

def test_data_dir_comes_from_flag_then_env_then_default(tmp_path, monkeypatch):
    for name in ("flag", "env", "default/shared/datasets/amazon2014"):
        folder = tmp_path / name / "mini"
        folder.mkdir(parents=True)
        write_lines(folder / "sequences.txt.gz", [f"u1 {name[:4]}1 x y"])
        write_lines(folder / "items.jsonl.gz", [json.dumps({"item_id": i, "title": i})
                                                for i in (f"{name[:4]}1", "x", "y")])
    repo = tmp_path / "default" / "repo"
    repo.mkdir()
    monkeypatch.chdir(repo)  # the default is ../shared/datasets/amazon2014
    monkeypatch.delenv("TIGER_DATA_DIR", raising=False)

    def first_title(**kwargs) -> str:
        run = RunDir(tmp_path / "run")
        run_prepare(run, PrepareConfig(dataset="mini", **kwargs))
        return pq.read_table(run.items).column("title")[0].as_py()

    assert first_title() == "defa1"
    monkeypatch.setenv("TIGER_DATA_DIR", str(tmp_path / "env"))
    assert first_title() == "env1"
    assert first_title(data_dir=str(tmp_path / "flag")) == "flag1"


def test_missing_dataset_names_every_path_tried(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        run_prepare(RunDir(tmp_path / "run"), PrepareConfig(dataset="beauty", data_dir=str(tmp_path)))
    message = str(err.value)
    for path in (tmp_path / "beauty" / "sequences.txt.gz", tmp_path / "beauty" / "items.jsonl.gz",
                 tmp_path / "sequences.txt.gz", tmp_path / "items.jsonl.gz"):
        assert str(path) in message
    assert not (tmp_path / "run").exists()


def test_missing_generic_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        run_prepare(RunDir(tmp_path / "run"), PrepareConfig(
            format="sequences", sequences=str(tmp_path / "nope.txt"), items=str(tmp_path / "i.jsonl")))
    with pytest.raises(ValueError, match="--sequences FILE and --items FILE"):
        run_prepare(RunDir(tmp_path / "run"), PrepareConfig(format="sequences"))


# --- malformed input -------------------------------------------------------------------------

def prepare_generic(tmp_path, sequence_lines, item_lines, **kwargs):
    sequences = write_lines(tmp_path / "seqs.txt", sequence_lines)
    items = write_lines(tmp_path / "items.jsonl", item_lines)
    return run_prepare(RunDir(tmp_path / "run"), PrepareConfig(
        format="sequences", sequences=str(sequences), items=str(items), **kwargs))


ITEMS_ABC = [json.dumps({"item_id": x, "title": x.upper()}) for x in "abc"]


@pytest.mark.parametrize("sequence_lines, item_lines, message", [
    (["u1 a b c", "u2"], ITEMS_ABC, r"seqs.txt:2: user 'u2' has no items"),
    (["u1 a b c", "u2 a b c", "u1 c b a"], ITEMS_ABC, r"seqs.txt:3: user 'u1' appears again \(first at line 1\)"),
    (["u1 a b c"], [ITEMS_ABC[0], '{"item_id": "b", "title": "B"', ITEMS_ABC[2]],
     r"items.jsonl:2: not valid JSON"),
    (["u1 a b c"], [*ITEMS_ABC, "[1, 2]"], r"items.jsonl:4: expected a JSON object, got list"),
    (["u1 a b c"], [*ITEMS_ABC, '{"title": "no id"}'], r"items.jsonl:4: the item has neither"),
    (["u1 a b c"], [*ITEMS_ABC, '{"item_id": "a"}'], r"items.jsonl:4: item 'a' appears again \(first at .*items.jsonl:1\)"),
    (["u1 a b c"], [*ITEMS_ABC, '{"item_id": "d", "price": "cheap"}'], r"items.jsonl:4: price must be"),
    (["u1 a b c"], [*ITEMS_ABC, '{"item_id": "d", "title": ["x"]}'], r"items.jsonl:4: title must be a string"),
    (["u1 a b c"], [*ITEMS_ABC, '{"item_id": "d", "categories": {"a": 1}}'], r"items.jsonl:4: categories must be"),
])
def test_malformed_lines_fail_with_file_line_and_reason(tmp_path, sequence_lines, item_lines, message):
    with pytest.raises(ValueError, match=message):
        prepare_generic(tmp_path, sequence_lines, item_lines)
    assert not (tmp_path / "run").exists()


def test_items_without_metadata_are_counted_with_examples(tmp_path):
    missing = [f"m{i}" for i in range(7)]
    with pytest.raises(ValueError) as err:
        prepare_generic(tmp_path, ["u1 a b c " + " ".join(missing), "u2 a m0 b"], ITEMS_ABC)
    message = str(err.value)
    assert message.startswith("7 item ids in the sequences have no metadata row: m0 (first in ")
    assert "seqs.txt:1" in message
    assert all(m in message for m in missing[:5]) and "m5" not in message  # at most 5 examples


def test_users_too_short_for_leave_one_out_are_reported(tmp_path):
    with pytest.raises(ValueError) as err:
        prepare_generic(tmp_path, ["u1 a b c", "u2 a b", "u3 c"], ITEMS_ABC)
    message = str(err.value)
    assert message.startswith("2 of 3 users have fewer than 3 items")
    assert "u2 (2 items, " in message and "seqs.txt:2" in message and "u3 (1 items" in message


# --- atomic output -------------------------------------------------------------------------

def test_a_failed_write_leaves_no_partial_run_directory(generic_files, tmp_path, monkeypatch):
    sequences_path, items_path = generic_files
    config = PrepareConfig(format="sequences", sequences=str(sequences_path), items=str(items_path))
    real_write = pq.write_table
    calls = []

    def fail_on_second_file(table, where, *args, **kwargs):
        calls.append(where)
        real_write(table, where, *args, **kwargs)  # the first file is complete on disk ...
        if len(calls) == 2:
            raise OSError("disk full")  # ... when writing the second one fails

    monkeypatch.setattr(pq, "write_table", fail_on_second_file)
    fresh = RunDir(tmp_path / "fresh")
    with pytest.raises(OSError, match="disk full"):
        run_prepare(fresh, config)
    assert not fresh.root.exists()

    # An existing complete run keeps its previous files untouched, with no temporary files left.
    existing = RunDir(tmp_path / "existing")
    monkeypatch.setattr(pq, "write_table", real_write)
    run_prepare(existing, config)
    before = {p.name: p.read_bytes() for p in existing.root.iterdir()}
    calls.clear()
    monkeypatch.setattr(pq, "write_table", fail_on_second_file)
    with pytest.raises(OSError, match="disk full"):
        run_prepare(existing, PrepareConfig(**{**config.__dict__, "keep_cold_items": True}))
    assert {p.name: p.read_bytes() for p in existing.root.iterdir()} == before


def test_rerunning_replaces_the_outputs(generic_files, tmp_path):
    sequences_path, items_path = generic_files
    run = RunDir(tmp_path / "run")
    config = PrepareConfig(format="sequences", sequences=str(sequences_path), items=str(items_path))
    run_prepare(run, config)
    run_prepare(run, PrepareConfig(**{**config.__dict__, "keep_cold_items": True}))
    assert pq.read_table(run.items).num_rows == 6
    assert json.loads(run.stats.read_text())["config"]["keep_cold_items"] is True
    assert sorted(p.name for p in run.root.iterdir()) == ["items.parquet", "sequences.parquet",
                                                          "stats.json"]


# --- the command line -------------------------------------------------------------------------

def test_cli_prepare_accepts_run_as_alias_and_prints_errors_cleanly(generic_files, tmp_path,
                                                                     monkeypatch, capsys):
    sequences_path, items_path = generic_files
    code = tiger(["prepare", "--format", "sequences", "--sequences", str(sequences_path),
                  "--items", str(items_path), "--run", str(tmp_path / "run")], monkeypatch)
    assert code == 0
    out = capsys.readouterr().out
    assert "interactions" in out and "10" in out
    assert np.array_equal(read_sequences(tmp_path / "run" / "sequences.parquet").lengths, [4, 3, 3])

    code = tiger(["prepare", "--dataset", "beauty", "--data-dir", str(tmp_path / "none"),
                  "--out", str(tmp_path / "run2")], monkeypatch)
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("tiger prepare: error: dataset 'beauty'")
    assert "Traceback" not in err


@pytest.mark.parametrize("damage", ["truncated", "not_utf8"])
def test_unreadable_files_fail_with_file_and_line(tmp_path, damage):
    sequences = write_lines(tmp_path / "seqs.txt.gz", [f"u{i} a b c" for i in range(2000)])
    if damage == "truncated":
        data = sequences.read_bytes()
        sequences.write_bytes(data[: len(data) // 2])
        message = r"seqs.txt.gz: cannot be read after line \d+ \(EOFError"
    else:
        with gzip.open(sequences, "ab") as handle:
            handle.write(b"u9 a \xff\xfe c\n")
        message = r"seqs.txt.gz: cannot be read after line \d+ \(UnicodeDecodeError"
    items = write_lines(tmp_path / "items.jsonl", ITEMS_ABC)
    with pytest.raises(ValueError, match=message):
        run_prepare(RunDir(tmp_path / "run"), PrepareConfig(
            format="sequences", sequences=str(sequences), items=str(items)))
