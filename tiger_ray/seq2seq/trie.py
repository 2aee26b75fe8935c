"""A compact prefix trie over Semantic IDs, for constrained decoding.

Stored level by level in CSR form (a few integer arrays, no Python object per node):

    level d (0..L)       the distinct ID prefixes of length d, in lexicographic order; level 0 is
                         the root, level L the items themselves
    keys[d]              for each node m of level d >= 1: parent(m) * codebook_sizes[d-1] + last code,
                         ascending (children of one parent are contiguous and sorted by code)
    first_child[d]       for level d < L, CSR offsets: the children of node n are the level-(d+1)
                         nodes first_child[d][n] : first_child[d][n+1]
    leaf_item            item id of each level-L node

Memory is at most 16 * L + 8 bytes per item (72 for 4-code IDs); a child is found by binary
search on keys, the allowed next codes of a node are one contiguous slice.
The arrays are torch tensors so decoding runs on the model's device (``.to(device)``).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch


class SemanticIdTrie:
    def __init__(self, item_ids: np.ndarray, codes: np.ndarray, codebook_sizes: Sequence[int]):
        item_ids = np.asarray(item_ids, dtype=np.int64)
        codes = np.asarray(codes, dtype=np.int64)
        if codes.ndim != 2 or len(codes) != len(item_ids) or codes.shape[1] != len(codebook_sizes):
            raise ValueError(f"codes must be [{len(item_ids)}, {len(codebook_sizes)}], got {codes.shape}")
        if len(codes) == 0:
            raise ValueError("cannot build a trie over an empty catalog")
        sizes = np.asarray(codebook_sizes, dtype=np.int64)
        if (codes < 0).any() or (codes >= sizes).any():
            raise ValueError("codes out of range of codebook_sizes")
        self.codebook_sizes = tuple(int(s) for s in sizes)
        self.depth = codes.shape[1]

        order = np.lexsort(codes.T[::-1])  # lexicographic: c0 first
        codes, item_ids = codes[order], item_ids[order]
        if (codes[1:] == codes[:-1]).all(axis=1).any():
            raise ValueError("two items share one Semantic ID; the trie needs unique IDs")
        keys, first_child = [torch.zeros(1, dtype=torch.long)], []
        node_of_row = np.zeros(len(codes), dtype=np.int64)  # each row's node on the previous level
        for d in range(1, self.depth + 1):
            new = np.ones(len(codes), dtype=bool)  # row starts a new level-d prefix
            new[1:] = (codes[1:, :d] != codes[:-1, :d]).any(axis=1)
            level_keys = node_of_row[new] * sizes[d - 1] + codes[new, d - 1]
            n_parents = int(node_of_row[-1]) + 1
            first_child.append(torch.from_numpy(
                np.searchsorted(level_keys, np.arange(n_parents + 1) * sizes[d - 1])))
            keys.append(torch.from_numpy(level_keys))
            node_of_row = np.cumsum(new) - 1
        self.keys, self.first_child = keys, first_child
        self.leaf_item = torch.from_numpy(item_ids)  # level-L nodes are the sorted rows
        self.num_items = len(item_ids)

    @classmethod
    def from_semantic_ids(cls, semantic_ids, exclude_items: np.ndarray | None = None,
                          only_items: np.ndarray | None = None) -> "SemanticIdTrie":
        """Trie over a ``SemanticIds`` table, optionally without some items or with only some
        (e.g. the unseen items of the cold-start evaluation)."""
        keep = np.ones(semantic_ids.num_items, dtype=bool)
        if exclude_items is not None:
            keep &= ~np.isin(semantic_ids.item_ids, exclude_items)
        if only_items is not None:
            keep &= np.isin(semantic_ids.item_ids, only_items)
        if not keep.any():
            raise ValueError("the trie would hold no items")
        return cls(semantic_ids.item_ids[keep], semantic_ids.codes[keep], semantic_ids.codebook_sizes)

    def to(self, device) -> "SemanticIdTrie":
        self.keys = [k.to(device) for k in self.keys]
        self.first_child = [f.to(device) for f in self.first_child]
        self.leaf_item = self.leaf_item.to(device)
        return self

    def num_nodes(self, level: int) -> int:
        return len(self.keys[level])

    def nbytes(self) -> int:
        tensors = [*self.keys, *self.first_child, self.leaf_item]
        return sum(t.numel() * t.element_size() for t in tensors)

    # ---- queries (nodes: LongTensor of level-``level`` node ids, -1 = dead / not in the trie) ----
    def children(self, nodes: torch.Tensor, level: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """All children of a batch of nodes as flat lists: (row in ``nodes``, code, child node)."""
        alive = nodes >= 0
        n = nodes.clamp(min=0)
        start = self.first_child[level][n]
        count = torch.where(alive, self.first_child[level][n + 1] - start, 0)
        rows = torch.repeat_interleave(torch.arange(len(nodes), device=nodes.device), count)
        # position of each entry within its row's run of children
        run_start = torch.repeat_interleave(torch.cumsum(count, 0) - count, count)
        child = start[rows] + torch.arange(len(rows), device=nodes.device) - run_start
        return rows, self.keys[level + 1][child] % self.codebook_sizes[level], child

    def allowed_mask(self, nodes: torch.Tensor, level: int) -> torch.Tensor:
        """[len(nodes), codebook_sizes[level]] bool: which next codes extend each prefix."""
        rows, codes, _ = self.children(nodes, level)
        mask = torch.zeros(len(nodes), self.codebook_sizes[level], dtype=torch.bool, device=nodes.device)
        mask[rows, codes] = True
        return mask

    def child(self, nodes: torch.Tensor, level: int, codes: torch.Tensor) -> torch.Tensor:
        """Level-(level+1) node reached from ``nodes`` by ``codes``; -1 if that prefix is not an ID."""
        keys = self.keys[level + 1]
        query = nodes.clamp(min=0) * self.codebook_sizes[level] + codes
        pos = torch.searchsorted(keys, query).clamp(max=len(keys) - 1)
        found = (nodes >= 0) & (codes >= 0) & (codes < self.codebook_sizes[level]) & (keys[pos] == query)
        return torch.where(found, pos, -1)

    def items(self, leaves: torch.Tensor) -> torch.Tensor:
        """Item id of each level-L node, -1 for -1."""
        return torch.where(leaves >= 0, self.leaf_item[leaves.clamp(min=0)], -1)

    # ---- convenience on code prefixes (numpy in, numpy out) ------------------------------------
    def prefix_nodes(self, prefixes: np.ndarray) -> torch.Tensor:
        """[B, d] code prefixes -> their level-d node ids (-1 where no item has that prefix)."""
        prefixes = torch.as_tensor(np.asarray(prefixes, dtype=np.int64), device=self.leaf_item.device)
        nodes = torch.zeros(prefixes.shape[0], dtype=torch.long, device=prefixes.device)
        for level in range(prefixes.shape[1]):
            nodes = self.child(nodes, level, prefixes[:, level])
        return nodes

    def allowed_next(self, prefixes: np.ndarray) -> np.ndarray:
        """[B, d] code prefixes (d < L) -> [B, codebook_sizes[d]] mask of codes that extend them."""
        prefixes = np.asarray(prefixes, dtype=np.int64).reshape(len(prefixes), -1)
        return self.allowed_mask(self.prefix_nodes(prefixes), prefixes.shape[1]).cpu().numpy()

    def lookup(self, codes: np.ndarray) -> np.ndarray:
        """[B, L] full codes -> item ids (-1 if no such item)."""
        return self.items(self.prefix_nodes(codes)).cpu().numpy()
