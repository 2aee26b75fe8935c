"""TIGER's generative retrieval: Semantic-ID tokenizer, seq2seq Transformer, trie-constrained
beam search, the evaluation retriever and cold-start decoding (training lives in train/ray_train)."""
