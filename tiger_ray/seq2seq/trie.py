"""The prefix trie of constrained decoding, over the sorted-key index (``semantic_ids/index.py``).

No node arrays: the items' packed 4-code keys are sorted, so every prefix of d codes is one
contiguous key range, and a trie node is the position of the first key of its range (the root is
0 at level 0, a level-L node is an item's position). Memory is the index itself, 8 bytes per item
(4-byte key + 4-byte item id) with 256-code books; a memory-mapped index is used in place.

    child(node, code)      binary search for the first key of the extended prefix, and a check
    allowed_mask(nodes)    the same for every code of the level at once, [nodes x codebook]
                           (the root's answer is computed once)

so each decoding step costs O(beams x codebook x log N), nearly flat in the catalog size.
The arrays are torch tensors so decoding runs on the model's device (``.to(device)``).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from tiger_ray.semantic_ids.index import SemanticIdIndex


def _tensor(array: np.ndarray) -> torch.Tensor:
    """A tensor over the numpy array's memory (also a read-only memory map: no copy is made,
    and decoding only reads)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*not writable.*")
        return torch.from_numpy(array)


class SemanticIdTrie:
    def __init__(self, item_ids: np.ndarray, codes: np.ndarray, codebook_sizes: Sequence[int]):
        item_ids = np.asarray(item_ids, dtype=np.int64)
        codes = np.asarray(codes, dtype=np.int64)
        if codes.ndim != 2 or len(codes) != len(item_ids) or codes.shape[1] != len(codebook_sizes):
            raise ValueError(f"codes must be [{len(item_ids)}, {len(codebook_sizes)}], got {codes.shape}")
        if len(codes) == 0:
            raise ValueError("cannot build a trie over an empty catalog")
        self._attach(SemanticIdIndex.build(item_ids, codes, codebook_sizes))

    @classmethod
    def from_index(cls, index: SemanticIdIndex) -> "SemanticIdTrie":
        if index.num_items == 0:
            raise ValueError("cannot build a trie over an empty catalog")
        self = cls.__new__(cls)
        self._attach(index)
        return self

    def _attach(self, index: SemanticIdIndex) -> None:
        self.index = index
        self.codebook_sizes = index.codebook_sizes
        self.radix = index.radix
        self.depth = index.depth
        self.num_items = index.num_items
        self._offset = index.key_offset
        self._strides = index.strides
        self.keys = _tensor(index.keys)
        self.leaf_item = _tensor(index.items)
        self._root = None  # (positions, found) of the root's children, computed once

    @classmethod
    def from_semantic_ids(cls, semantic_ids, exclude_items: np.ndarray | None = None,
                          only_items: np.ndarray | None = None) -> "SemanticIdTrie":
        """Trie over a ``SemanticIds`` table (its own, possibly memory-mapped, index), optionally
        without some items or with only some (e.g. the unseen items of the cold-start evaluation)."""
        if exclude_items is None and only_items is None:
            return cls.from_index(semantic_ids.index())
        keep = np.ones(semantic_ids.num_items, dtype=bool)
        item_ids = semantic_ids.item_ids
        if exclude_items is not None:
            keep &= ~np.isin(item_ids, exclude_items)
        if only_items is not None:
            keep &= np.isin(item_ids, only_items)
        if not keep.any():
            raise ValueError("the trie would hold no items")
        return cls(item_ids[keep], semantic_ids.codes[keep], semantic_ids.codebook_sizes)

    def save(self, directory: str | Path) -> Path:
        """index_keys.npy, index_items.npy, index.json (``SemanticIdIndex`` files)."""
        index = SemanticIdIndex(np.asarray(self.keys.cpu().numpy()), np.asarray(self.leaf_item.cpu().numpy()),
                                self.radix, self.codebook_sizes)
        return index.save(directory)

    @classmethod
    def open(cls, directory: str | Path, codebook_sizes: Sequence[int] | None = None) -> "SemanticIdTrie":
        """The trie over a saved index, memory-mapped (every process shares the pages)."""
        return cls.from_index(SemanticIdIndex.open(directory, codebook_sizes))

    def to(self, device) -> "SemanticIdTrie":
        self.keys = self.keys.to(device)
        self.leaf_item = self.leaf_item.to(device)
        self._root = None
        return self

    def num_nodes(self, level: int) -> int:
        return self.index.num_prefixes(level) if self.keys.device.type == "cpu" else \
            int(torch.unique_consecutive(self._true(self.keys) // self._strides[level]).numel())

    def nbytes(self) -> int:
        return self.keys.numel() * self.keys.element_size() + self.leaf_item.numel() * self.leaf_item.element_size()

    # ---- key arithmetic -------------------------------------------------------------------------
    def _true(self, stored: torch.Tensor) -> torch.Tensor:
        return stored.long() + self._offset

    def _search(self, true_keys: torch.Tensor) -> torch.Tensor:
        """Position of the first key >= each query (int64 true keys below the key space's end)."""
        stored = (true_keys - self._offset).to(self.keys.dtype)
        return torch.searchsorted(self.keys, stored.contiguous()).clamp_(max=self.num_items - 1)

    def _first_key(self, nodes: torch.Tensor, level: int, codes: torch.Tensor) -> torch.Tensor:
        """Smallest key of the prefix (node's prefix, code); codes must be < radix[level]."""
        prefix = self._true(self.keys[nodes.clamp(min=0)]) // self._strides[level]
        if codes.dim() > prefix.dim():
            prefix = prefix[:, None]
        return (prefix * self.radix[level] + codes) * self._strides[level + 1]

    def _positions(self, nodes: torch.Tensor, level: int) -> tuple[torch.Tensor, torch.Tensor]:
        """For every node and every code of ``level``: (child position, child exists), [n, size]."""
        size = self.codebook_sizes[level]
        usable = min(size, self.radix[level])  # codes >= radix cannot occur in any key
        if level == 0:
            if self._root is None:
                self._root = self._positions_of(torch.zeros(1, dtype=torch.long, device=self.keys.device),
                                                0, usable, size)
            pos, found = self._root
            alive = (nodes >= 0)[:, None]
            return pos.expand(len(nodes), -1), found & alive
        return self._positions_of(nodes, level, usable, size)

    def _positions_of(self, nodes, level, usable, size):
        codes = torch.arange(usable, device=self.keys.device)[None]
        first = self._first_key(nodes, level, codes)  # [n, usable]
        pos = self._search(first.flatten()).view(first.shape)
        key = self._true(self.keys[pos])
        found = (nodes >= 0)[:, None] & (key >= first) & (key < first + self._strides[level + 1])
        if usable < size:
            pad = size - usable
            pos = torch.cat([pos, pos.new_zeros(len(nodes), pad)], 1)
            found = torch.cat([found, found.new_zeros(len(nodes), pad)], 1)
        return pos, found

    # ---- queries (nodes: LongTensor of level-``level`` node ids, -1 = dead / not in the trie) ----
    def children(self, nodes: torch.Tensor, level: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """All children of a batch of nodes as flat lists: (row in ``nodes``, code, child node),
        rows ascending, codes ascending within a row."""
        pos, found = self._positions(nodes, level)
        rows, codes = found.nonzero(as_tuple=True)
        return rows, codes, pos[rows, codes]

    def allowed_mask(self, nodes: torch.Tensor, level: int) -> torch.Tensor:
        """[len(nodes), codebook_sizes[level]] bool: which next codes extend each prefix."""
        return self._positions(nodes, level)[1]

    def child(self, nodes: torch.Tensor, level: int, codes: torch.Tensor) -> torch.Tensor:
        """Level-(level+1) node reached from ``nodes`` by ``codes``; -1 if that prefix is not an ID."""
        valid = (nodes >= 0) & (codes >= 0) & (codes < min(self.codebook_sizes[level], self.radix[level]))
        first = self._first_key(nodes, level, torch.where(valid, codes, 0))
        pos = self._search(first)
        key = self._true(self.keys[pos])
        found = valid & (key >= first) & (key < first + self._strides[level + 1])
        return torch.where(found, pos, -1)

    def items(self, leaves: torch.Tensor) -> torch.Tensor:
        """Item id of each level-L node, -1 for -1."""
        return torch.where(leaves >= 0, self.leaf_item[leaves.clamp(min=0)].long(), -1)

    # ---- convenience on code prefixes (numpy in, numpy out) ------------------------------------
    def prefix_nodes(self, prefixes: np.ndarray) -> torch.Tensor:
        """[B, d] code prefixes -> their level-d node ids (-1 where no item has that prefix)."""
        prefixes = torch.as_tensor(np.asarray(prefixes, dtype=np.int64), device=self.keys.device)
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
