"""FAISS index: catalog ids (not row numbers), save/load, HNSW and IVF-PQ against exact search."""

from __future__ import annotations

import numpy as np
import pytest

from tiger_ray.baseline.ann_index import (AnnIndex, IndexConfig, ann_recall, exact_top_k, measure)


@pytest.fixture(autouse=True)
def one_faiss_thread():
    """The CPU is shared: OpenMP teams spin-wait and make builds 5x slower than one thread."""
    from tiger_ray.baseline.ann_index import omp_threads

    with omp_threads(1):
        yield


def _clustered(n: int, dim: int = 16, clusters: int = 20, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(clusters, dim))
    x = centers[rng.integers(clusters, size=n)] + 0.3 * rng.normal(size=(n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_search_returns_catalog_ids_not_rows():
    vectors = _clustered(50)
    ids = 1000 + 7 * np.arange(50)  # catalog ids unrelated to row numbers
    index = AnnIndex.build(vectors, ids, IndexConfig("flat"))
    found, scores = index.search(vectors[[3, 17]], k=1)
    assert found[:, 0].tolist() == [ids[3], ids[17]]
    assert scores[:, 0] == pytest.approx([1.0, 1.0], abs=1e-5)  # unit vectors: <v, v> = 1
    assert set(index.item_ids().tolist()) == set(ids.tolist())
    # asking for more than the catalog holds leaves -1 slots
    found, _ = index.search(vectors[:1], k=60)
    assert (found[0, 50:] == -1).all() and (found[0, :50] >= 1000).all()


def test_flat_matches_brute_force_and_rejects_bad_input():
    vectors = _clustered(300)
    ids = np.arange(1, 301)
    queries = _clustered(40, seed=1)
    index = AnnIndex.build(vectors, ids, IndexConfig("flat"))
    found, _ = index.search(queries, 10)
    assert np.array_equal(found, exact_top_k(vectors, ids, queries, 10))
    with pytest.raises(ValueError, match="not unique"):
        AnnIndex.build(vectors[:2], np.array([5, 5]), IndexConfig("flat"))
    with pytest.raises(ValueError, match="queries must be"):
        index.search(queries[:, :4], 10)


@pytest.mark.parametrize("config", [
    IndexConfig("flat"),
    IndexConfig("hnsw", hnsw_m=16, hnsw_ef_construction=80, hnsw_ef_search=64),
    IndexConfig("ivfpq", ivf_nlist=16, ivf_nprobe=8, pq_m=8, pq_nbits=6),
], ids=lambda c: c.index_type)
def test_save_load_round_trip(tmp_path, config):
    vectors = _clustered(1200)
    ids = np.arange(1, 1201) * 3
    queries = _clustered(30, seed=2)
    index = AnnIndex.build(vectors, ids, config)
    before = index.search(queries, 10)
    index.save(tmp_path / "idx", extra={"note": "x"})
    loaded = AnnIndex.load(tmp_path / "idx")
    after = loaded.search(queries, 10)
    assert loaded.config == config and loaded.ntotal == 1200 and loaded.dim == 16
    assert np.array_equal(before[0], after[0])
    np.testing.assert_allclose(before[1], after[1], rtol=1e-6)
    assert loaded.nbytes() == index.nbytes() > 0


def test_hnsw_and_ivfpq_recall_against_exact():
    vectors = _clustered(3000)
    ids = np.arange(1, 3001)
    queries = _clustered(200, seed=3)
    hnsw = AnnIndex.build(vectors, ids, IndexConfig("hnsw", hnsw_m=16, hnsw_ef_construction=100,
                                                    hnsw_ef_search=128))
    ivfpq = AnnIndex.build(vectors, ids, IndexConfig("ivfpq", ivf_nlist=32, ivf_nprobe=32, pq_m=8, pq_nbits=6))
    low_probe = AnnIndex.build(vectors, ids, IndexConfig("ivfpq", ivf_nlist=32, ivf_nprobe=1, pq_m=8, pq_nbits=6))
    r_hnsw = measure(hnsw, vectors, ids, queries)["ann_recall@10"]
    r_ivfpq = measure(ivfpq, vectors, ids, queries)["ann_recall@10"]
    r_low = measure(low_probe, vectors, ids, queries)["ann_recall@10"]
    assert r_hnsw > 0.9
    assert 0.3 < r_ivfpq < 1.0  # quantised distances: good but not exact
    assert r_low < r_ivfpq  # visiting fewer lists finds fewer true neighbours
    # compression: PQ codes (8 x 6 bits) are much smaller than float vectors (64 bytes)
    assert ivfpq.nbytes() < hnsw.nbytes()


def test_search_params_override_on_load(tmp_path):
    vectors = _clustered(1200)
    ids = np.arange(1, 1201)
    AnnIndex.build(vectors, ids, IndexConfig("ivfpq", ivf_nlist=16, ivf_nprobe=16, pq_m=8, pq_nbits=6)).save(tmp_path / "i")
    assert AnnIndex.load(tmp_path / "i", ivf_nprobe=2).config.ivf_nprobe == 2
    with pytest.raises(ValueError, match="pq_m"):
        AnnIndex.build(vectors, ids, IndexConfig("ivfpq", pq_m=5))
    with pytest.raises(FileNotFoundError, match="baseline-index"):
        AnnIndex.load(tmp_path / "missing")


def test_gpu_index_falls_back_to_cpu_without_gpu(caplog):
    from tiger_ray.baseline.ann_index import faiss_gpus

    vectors = _clustered(100)
    index = AnnIndex.build(vectors, np.arange(1, 101), IndexConfig("flat", gpu_index=True))
    if faiss_gpus() == 0:
        assert not index.on_gpu
        assert "searching on CPU" in caplog.text
    assert index.search(vectors[:1], 1)[0][0, 0] == 1


def test_ann_recall_counts_overlap():
    exact = np.array([[1, 2, 3, 4], [5, 6, 7, 8]])
    approx = np.array([[4, 3, 9, -1], [5, 6, 7, 8]])
    assert ann_recall(approx, exact) == pytest.approx((2 / 4 + 4 / 4) / 2)


def test_exact_top_k_in_item_chunks_matches_one_pass():
    vectors = _clustered(500, seed=4)
    queries = _clustered(40, seed=5)
    ids = np.arange(1, 501)
    scores = queries @ vectors.T
    expected = ids[np.argsort(-scores, axis=1, kind="stable")[:, :10]]
    assert np.array_equal(exact_top_k(vectors, ids, queries, 10, chunk=16, item_chunk=64), expected)
    raw = vectors * np.random.default_rng(0).uniform(0.5, 3.0, size=(500, 1)).astype(np.float32)
    assert np.array_equal(exact_top_k(raw, ids, queries, 10, item_chunk=77, normalize=True), expected)


@pytest.mark.ray
def test_shards_merged_on_disk_search_like_one_in_memory_index(tmp_path, ray_local):
    import faiss

    from tiger_ray.baseline import ondisk_index

    n, dim = 20_000, 16
    table = np.zeros((n + 1, dim), np.float32)
    table[1:] = _clustered(n, dim=dim, clusters=50, seed=1) * 2.5  # unnormalised, as the item tower gives
    np.save(tmp_path / "table.npy", table)
    config = IndexConfig("ivfpq", ivf_nlist=64, ivf_nprobe=8, pq_m=8, pq_nbits=8)
    path = ondisk_index.build_ondisk_ivfpq(
        tmp_path / "table.npy", tmp_path / "index-ivfpq", nlist=64, pq_m=8, pq_nbits=8, nprobe=8,
        train_sample=5000, shards=3, normalize=True, meta={"index_type": "ivfpq", "config": config.__dict__})
    assert sorted(p.name for p in path.iterdir()) == ["index.faiss", "index.json", "lists.ivfdata"]

    # The same trained quantizer and codebooks, every item added in one process, in memory.
    vectors = table[1:] / np.linalg.norm(table[1:], axis=1, keepdims=True)
    in_memory = ondisk_index.train_ivfpq(np.load(tmp_path / "table.npy", mmap_mode="r"), 64, 8, 8, 5000, True)
    in_memory.add_with_ids(vectors, np.arange(1, n + 1))
    in_memory.nprobe = 8
    queries = _clustered(200, dim=dim, clusters=50, seed=2)
    want_scores, want_ids = in_memory.search(queries, 10)

    loaded = AnnIndex.load(path)  # lists memory-mapped from lists.ivfdata, not read into RAM
    invlists = faiss.extract_index_ivf(loaded.cpu_index).invlists
    assert loaded.directory == path and "OnDisk" in type(faiss.downcast_InvertedLists(invlists)).__name__
    got_ids, got_scores = loaded.search(queries, 10)
    assert np.array_equal(got_ids, want_ids)
    np.testing.assert_allclose(got_scores, want_scores, rtol=1e-5, atol=1e-6)
    assert loaded.ntotal == n and sorted(loaded.item_ids().tolist()) == list(range(1, n + 1))
    assert loaded.nbytes() == sum(p.stat().st_size for p in path.iterdir() if p.suffix != ".json")
    assert loaded.nbytes() / n < 30  # 8 code bytes + 8 id bytes per item, plus codebooks

    # Recall against exact search on the same vectors, and the nprobe override on load.
    exact = exact_top_k(table[1:], np.arange(1, n + 1), queries, 10, normalize=True)
    assert ann_recall(got_ids, exact) > 0.5
    wide = AnnIndex.load(path, ivf_nprobe=64)
    assert ann_recall(wide.search(queries, 10)[0], exact) >= ann_recall(got_ids, exact)


def test_ivfpq_refine_reranks_candidates_by_exact_scores():
    vectors = _clustered(3000, dim=16, clusters=30, seed=6)
    ids = np.arange(1, 3001)
    table = np.vstack([np.zeros((1, 16), np.float32), vectors * 3.0])  # by item id, unnormalised
    queries = _clustered(100, dim=16, clusters=30, seed=7)
    exact = exact_top_k(vectors, ids, queries, 10)
    config = IndexConfig("ivfpq", ivf_nlist=16, ivf_nprobe=16, pq_m=4, pq_nbits=6)
    plain = AnnIndex.build(vectors, ids, config)
    refined = AnnIndex.build(vectors, ids, IndexConfig(**{**config.__dict__, "ivf_refine": 8}))
    refined.attach_vectors(table, normalize=True)
    got, scores = refined.search(queries, 10)
    assert ann_recall(got, exact) > ann_recall(plain.search(queries, 10)[0], exact)
    assert ann_recall(got, exact) > 0.9
    np.testing.assert_allclose(scores, np.einsum("bd,bkd->bk", queries, vectors[got - 1]), rtol=1e-5, atol=1e-6)
    assert (np.diff(scores, axis=1) <= 0).all()


def test_ivfpq_nprobe_grows_with_nlist_and_the_recall_curve_is_measured(tmp_path):
    from tiger_ray.baseline.ann_index import measure, nlist_for, nprobe_for

    # Auto nprobe: ~1/64 of the lists (at least 16), so recall holds as the catalog grows; nlist
    # is capped by the training sample (39 points per centroid), not only by the catalog.
    assert nprobe_for(IndexConfig(), 1265) == 19 and nprobe_for(IndexConfig(), 6721) == 105
    assert nprobe_for(IndexConfig(ivf_nprobe=8), 6721) == 8 and nprobe_for(IndexConfig(), 10) == 10
    assert nlist_for(IndexConfig(), 10_000_000, train_count=262_144) == 6721

    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((8000, 32)).astype(np.float32)
    ids = np.arange(1, 8001, dtype=np.int64)
    index = AnnIndex.build(vectors, ids, IndexConfig("ivfpq", ivf_nlist=256, pq_m=8, pq_nbits=6))
    assert index.nprobe == 16
    measured = measure(index, vectors, ids, vectors[:200] + 0.05, k=10)
    curve = measured["nprobe_curve"]
    assert [p["nprobe"] for p in curve] == [4, 8, 16, 32, 64]
    recalls = [p["ann_recall@10"] for p in curve]
    assert recalls == sorted(recalls) and recalls[-1] > recalls[0]
    assert measured["nprobe"] == 16 and index.nprobe == 16  # the sweep leaves the chosen nprobe
    assert "refine_curve" not in measured  # no item vectors attached: nothing to re-rank with
    table = np.concatenate([np.zeros((1, 32), np.float32), vectors])  # row = item id
    index.attach_vectors(table, normalize=False)
    refined = measure(index, vectors, ids, vectors[:200] + 0.05, k=10)["refine_curve"]
    assert [p["refine"] for p in refined] == [0, 2, 5, 10, 20] and index.config.ivf_refine == 0
    assert refined[-1]["ann_recall@10"] > refined[0]["ann_recall@10"]  # exact re-ranking helps PQ
    index.save(tmp_path / "i", extra=measured)
    assert AnnIndex.load(tmp_path / "i").nprobe == 16
