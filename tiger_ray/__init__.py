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
