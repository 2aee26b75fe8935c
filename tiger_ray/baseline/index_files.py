"""File names of a saved FAISS index directory, shared by the in-memory (``ann_index``) and the
on-disk (``ondisk_index``) builders so neither imports the other for them."""

INDEX_FILE = "index.faiss"  # the FAISS index (for an on-disk IVF-PQ: without its lists)
META_FILE = "index.json"  # what was built and how; written last, it marks the index complete
