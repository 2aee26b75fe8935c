"""tiger-ray: TIGER generative retrieval (Rajput et al., NeurIPS 2023) on Ray.

Pipeline, one package per stage, each a plain PyTorch/numpy core with its Ray runner beside it:

    data/          prepare: raw or shared Amazon 2014 files -> items/sequences Parquet, leave-one-out split
    embedding/     embed: item text -> sentence-encoder vectors (Ray Data actor pool)
    semantic_ids/  train-rqvae: RQ-VAE -> 4-token Semantic IDs (Ray Train, Ray Data inference)
    seq2seq/       train-seq2seq: encoder-decoder Transformer + trie-constrained beam search
    baseline/      train-baseline: dual encoder + FAISS ANN
    evaluation/    evaluate / compare: leave-one-out full-ranking Recall@K, NDCG@K
    serving/       serve: Ray Serve HTTP API
"""

__version__ = "0.1.0"

# Ray reads its settings when it is imported, not when it starts, so the loopback/no-usage-stats
# settings are exported as soon as any part of tiger_ray is imported (a user's own values win).
from tiger_ray.ray_env import apply_env as _apply_env  # noqa: E402  (light: os/json only)

_apply_env()

# The Python API (tiger_ray/api.py), loaded on first use so that `import tiger_ray` (done by every
# Ray worker) stays light.
__all__ = ["synth", "prepare", "embed", "train_rqvae", "train_seq2seq", "evaluate",
           "train_baseline", "compare", "serve", "stop_serving", "load_retriever", "Recommender"]


def __getattr__(name: str):
    if name in __all__:
        from tiger_ray import api

        return getattr(api, name)
    raise AttributeError(f"module 'tiger_ray' has no attribute {name!r}")
