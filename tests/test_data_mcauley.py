"""The original McAuley 2014 files: parsing, the 5-core filter, chronological order, safety."""

from __future__ import annotations

import gzip
import json

import pyarrow.parquet as pq
import pytest

from tiger_ray.data.mcauley import file_names, parse_meta_line, read_reviews
from tiger_ray.data.prepare import PrepareConfig, run_prepare
from tiger_ray.data.schema import read_sequences
from tiger_ray.runs import RunDir

# Each user's reviews as (asin, unixReviewTime), in the order they appear in the file.
# U1 reviewed C and B at the same second, C first in the file.
# F has one review, so U6 drops below 5 and goes in pass 1; that leaves G with 4 reviews, so G
# goes in pass 2 (U1..U4 keep 5 items each); U7 has only 3 reviews. Pass 3 changes nothing.
REVIEWS = {
    "U2": [("E", 10), ("D", 20), ("C", 30), ("B", 40), ("A", 50), ("G", 60)],
    "U1": [("E", 500), ("C", 200), ("G", 300), ("A", 100), ("B", 200), ("D", 400)],
    "U3": [("G", 0), ("A", 1), ("B", 2), ("C", 3), ("D", 4), ("E", 5)],
    "U4": [("A", 1), ("B", 2), ("G", 3), ("C", 4), ("D", 5), ("E", 6)],
    "U5": [("A", 5), ("B", 4), ("C", 3), ("D", 2), ("E", 1)],
    "U6": [("G", 1), ("F", 2), ("A", 3), ("B", 4), ("C", 5)],
    "U7": [("A", 1), ("B", 2), ("C", 3)],
}
# Expected after the 5-core filter, oldest first.
EXPECTED_ASINS = {
    "U2": ["E", "D", "C", "B", "A"],
    "U1": ["A", "C", "B", "D", "E"],
    "U3": ["A", "B", "C", "D", "E"],
    "U4": ["A", "B", "C", "D", "E"],
    "U5": ["E", "D", "C", "B", "A"],
}
META = [
    {"asin": "A", "title": "Rose &amp; Oud Perfume", "price": 12.5, "brand": "Acme",
     "categories": [["Beauty", "Fragrance"], ["Beauty"]], "related": {"also_bought": ["B", "C"]},
     "salesRank": {"Beauty": 1234}, "imUrl": "http://example.invalid/a.jpg"},
    {"asin": "B", "categories": [["Beauty", "Skin Care"]], "description": "no title, no price"},
    {"asin": "C", "title": "Lip Balm", "brand": "", "categories": [[]]},
    {"asin": "D", "title": "Nail Polish", "price": 3.0, "brand": "OPI",
     "categories": [["Beauty", "Makeup", "Nails"]]},
    {"asin": "E", "title": "Shampoo", "brand": "Suave", "categories": [["Beauty", "Hair Care"]]},
    {"asin": "F", "title": "Rare item", "categories": [["Beauty"]]},
    {"asin": "G", "title": "Cascade item", "categories": [["Beauty"]]},
    {"asin": "H", "title": "Nobody reviewed me", "categories": [["Beauty"]]},
]


def review_lines() -> list[str]:
    # Interleave users round-robin so the file is neither grouped by user nor sorted by time.
    lines, queues = [], {user: list(reviews) for user, reviews in REVIEWS.items()}
    while any(queues.values()):
        for user, queue in queues.items():
            if queue:
                asin, time = queue.pop(0)
                lines.append(json.dumps({"reviewerID": user, "asin": asin, "reviewerName": "x",
                                         "helpful": [0, 0], "reviewText": "great", "overall": 5.0,
                                         "summary": "ok", "unixReviewTime": time,
                                         "reviewTime": "01 1, 2014"}))
    return lines


def write_gz(path, lines):
    with gzip.open(path, "wt", encoding="utf-8") as handle:
        handle.write("".join(line + "\n" for line in lines))
    return path


def write_mcauley_files(folder, dataset="beauty", meta_lines=None, reviews=None):
    """reviews_<Category>_5.json.gz and meta_<Category>.json.gz as McAuley publishes them."""
    folder.mkdir(parents=True, exist_ok=True)
    reviews_name, meta_name = file_names(dataset)
    # meta lines are Python dict literals (single quotes), exactly as in the original files
    meta_lines = [repr(row) for row in META] if meta_lines is None else meta_lines
    return (write_gz(folder / reviews_name, review_lines() if reviews is None else reviews),
            write_gz(folder / meta_name, meta_lines))


def test_file_names_follow_mcauleys_categories():
    assert file_names("beauty") == ("reviews_Beauty_5.json.gz", "meta_Beauty.json.gz")
    assert file_names("sports") == ("reviews_Sports_and_Outdoors_5.json.gz",
                                    "meta_Sports_and_Outdoors.json.gz")
    assert file_names("toys") == ("reviews_Toys_and_Games_5.json.gz", "meta_Toys_and_Games.json.gz")
    assert file_names("Cell_Phones_and_Accessories")[0] == "reviews_Cell_Phones_and_Accessories_5.json.gz"


def test_reviews_are_ordered_by_time_with_file_order_breaking_ties(tmp_path):
    reviews, _ = write_mcauley_files(tmp_path)
    users = {u.key: u.items for u in read_reviews(reviews)}
    assert list(users) == list(REVIEWS)  # users in order of their first review
    assert users["U1"] == ["A", "C", "B", "G", "D", "E"]  # C and B share a second: file order


def test_mcauley_prepare_applies_the_5_core_filter_and_chronological_order(tmp_path):
    write_mcauley_files(tmp_path / "raw")
    run = RunDir(tmp_path / "run")
    stats = run_prepare(run, PrepareConfig(dataset="beauty", format="mcauley",
                                           data_dir=str(tmp_path / "raw")))
    assert stats["k_core"] == {"k": 5, "passes": 3, "users_removed": 2, "interactions_removed": 12}
    assert stats["input"] == {"users": 7, "interactions": 37}
    assert (stats["users"], stats["items"], stats["interactions"]) == (5, 5, 25)
    assert stats["paper"]["matches"] is False  # a tiny fixture, not the paper's Beauty

    items = pq.read_table(run.items).to_pylist()
    asin_of = {row["item_id"]: row["asin"] for row in items}
    sequences = read_sequences(run.sequences)
    got = [[asin_of[i] for i in sequences[u].tolist()] for u in range(len(sequences))]
    assert got == list(EXPECTED_ASINS.values())
    # ids by first appearance: U2's sequence E D C B A comes first
    assert [row["asin"] for row in items] == ["E", "D", "C", "B", "A"]

    by_asin = {row["asin"]: row for row in items}
    assert by_asin["A"]["title"] == "Rose & Oud Perfume"
    assert by_asin["A"]["text"] == ("Title: Rose & Oud Perfume; Price: $12.50; Brand: Acme; "
                                    "Categories: Beauty > Fragrance, Beauty")
    assert by_asin["B"]["text"] == "Categories: Beauty > Skin Care"
    assert by_asin["C"]["brand"] is None and by_asin["C"]["categories"] == []
    assert by_asin["C"]["text"] == "Title: Lip Balm"
    assert stats["coverage"] == {"title": 4, "brand": 3, "price": 2, "categories": 4}


def test_mcauley_and_generic_formats_give_the_same_canonical_output(tmp_path):
    write_mcauley_files(tmp_path / "raw")
    from_raw = RunDir(tmp_path / "from_raw")
    run_prepare(from_raw, PrepareConfig(dataset="beauty", format="mcauley",
                                        data_dir=str(tmp_path / "raw")))
    # The same 5-core data written in the generic format by hand.
    (tmp_path / "seqs.txt").write_text(
        "".join(f"{user} {' '.join(asins)}\n" for user, asins in EXPECTED_ASINS.items()))
    (tmp_path / "items.jsonl").write_text("".join(
        json.dumps({k: v for k, v in row.items() if k in ("asin", "title", "brand", "price",
                                                           "categories")}) + "\n"
        for row in META))
    generic = RunDir(tmp_path / "generic")
    run_prepare(generic, PrepareConfig(format="sequences", sequences=str(tmp_path / "seqs.txt"),
                                       items=str(tmp_path / "items.jsonl")))
    assert pq.read_table(from_raw.items).equals(pq.read_table(generic.items))
    assert pq.read_table(from_raw.sequences).equals(pq.read_table(generic.sequences))


@pytest.mark.parametrize("payload", [
    "__import__('os').system('touch {marker}')",
    "{{'asin': 'A', 'title': __import__('os').system('touch {marker}')}}",
    "{{'asin': 'A', 'title': (lambda: open('{marker}', 'w'))()}}",
])
def test_a_malicious_meta_line_is_rejected_with_file_and_line_never_run(tmp_path, payload):
    marker = tmp_path / "pwned"
    meta_lines = [repr(row) for row in META]
    meta_lines.insert(3, payload.format(marker=marker))
    write_mcauley_files(tmp_path / "raw", meta_lines=meta_lines)
    with pytest.raises(ValueError, match=r"meta_Beauty\.json\.gz:4: not a Python dict literal"):
        run_prepare(RunDir(tmp_path / "run"), PrepareConfig(dataset="beauty", format="mcauley",
                                                            data_dir=str(tmp_path / "raw")))
    assert not marker.exists()
    assert not (tmp_path / "run").exists()


def test_meta_lines_parse_as_json_or_python_literals_only():
    assert parse_meta_line('{"asin": "A", "price": 1.5}', "m:1") == {"asin": "A", "price": 1.5}
    assert parse_meta_line("{'asin': 'A', 'categories': [['X']]}", "m:2")["categories"] == [["X"]]
    with pytest.raises(ValueError, match="m:3: expected a dict, got list"):
        parse_meta_line("['A']", "m:3")
    with pytest.raises(ValueError, match="m:4: not a Python dict literal"):
        parse_meta_line("{'asin': 'A'", "m:4")


@pytest.mark.parametrize("line, message", [
    ('{"asin": "A", "unixReviewTime": 1}', r"reviews_Beauty_5\.json\.gz:2: review has no 'reviewerID'"),
    ('{"reviewerID": "U9", "asin": "A", "unixReviewTime": "yesterday"}', r":2: unixReviewTime must be a number"),
    ('{"reviewerID": "U9", "asin": "A", "unixReviewTime": 1', r":2: not valid JSON"),
])
def test_malformed_review_lines_fail_with_file_and_line(tmp_path, line, message):
    reviews = review_lines()
    reviews.insert(1, line)
    write_mcauley_files(tmp_path / "raw", reviews=reviews)
    with pytest.raises(ValueError, match=message):
        run_prepare(RunDir(tmp_path / "run"), PrepareConfig(dataset="beauty", format="mcauley",
                                                            data_dir=str(tmp_path / "raw")))


def test_kept_items_missing_from_meta_are_reported(tmp_path):
    write_mcauley_files(tmp_path / "raw", meta_lines=[repr(r) for r in META if r["asin"] not in "CD"])
    with pytest.raises(ValueError, match=r"^2 item ids in the sequences have no metadata row: D "):
        run_prepare(RunDir(tmp_path / "run"), PrepareConfig(dataset="beauty", format="mcauley",
                                                            data_dir=str(tmp_path / "raw")))


def test_a_duplicate_meta_row_of_a_kept_item_is_an_error(tmp_path):
    write_mcauley_files(tmp_path / "raw", meta_lines=[repr(r) for r in META] + [repr(META[0])])
    with pytest.raises(ValueError, match=r"meta_Beauty\.json\.gz:9: asin 'A' appears again "
                                         r"\(first at .*meta_Beauty\.json\.gz:1\)"):
        run_prepare(RunDir(tmp_path / "run"), PrepareConfig(dataset="beauty", format="mcauley",
                                                            data_dir=str(tmp_path / "raw")))


def test_missing_mcauley_files_name_the_expected_paths(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        run_prepare(RunDir(tmp_path / "run"), PrepareConfig(dataset="toys", format="mcauley",
                                                            data_dir=str(tmp_path)))
    assert str(tmp_path / "reviews_Toys_and_Games_5.json.gz") in str(err.value)
    assert str(tmp_path / "toys" / "meta_Toys_and_Games.json.gz") in str(err.value)
