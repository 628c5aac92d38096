"""A faiss vector index over a decoding store's keys (``store_index``), for stores past ``store_index_from``.

One index a batch row over the row's kept entries, the key heads concatenated ([Hkv·Dh]): the inner product of
that vector with the retrieval query (query heads summed per key head, flattened alike) is the store's score.
``flat`` (``IndexFlatIP``) is exact, so it retrieves what the dense score retrieves; ``hnsw``
(``IndexHNSWFlat``) is approximate and sublinear in the store's size. The store stays the source of truth
(values and positions come from it): the index only proposes candidates, which the store then filters and
scores exactly.
"""

from __future__ import annotations

import numpy as np
import torch

HNSW_NEIGHBOURS = 32  # graph degree of IndexHNSWFlat (faiss's M)
# Candidate lists of the HNSW graph while it is built and searched (faiss's defaults, 40 and 16, found about a
# fifth of the true top 10 among 20k random keys); a search looks at least SEARCH_BREADTH_PER_RESULT times as
# many candidates as it returns.
HNSW_BUILD_BREADTH = 128
HNSW_SEARCH_BREADTH = 128
SEARCH_BREADTH_PER_RESULT = 4


def _faiss():
    try:
        import faiss
    except ImportError as error:
        raise ImportError(
            "store_index 'flat' or 'hnsw' needs faiss: pip install 'bmojo[store]' (faiss-cpu), or store_index: dense"
        ) from error
    return faiss


class RowIndexes:
    """faiss indexes of a store's rows, ids being entry numbers in the store; grown as the store grows.

    A cache that reorders its rows (beam search) reorders the indexes alike (:meth:`continue_rows`).
    """

    def __init__(self, kind: str, batch: int, dim: int):
        faiss = _faiss()
        self.kind, self.indexed = kind, 0

        def new_index():
            if kind == "flat":
                return faiss.IndexIDMap(faiss.IndexFlatIP(dim))
            graph = faiss.IndexHNSWFlat(dim, HNSW_NEIGHBOURS, faiss.METRIC_INNER_PRODUCT)
            graph.hnsw.efConstruction = HNSW_BUILD_BREADTH
            return faiss.IndexIDMap(graph)

        self.indexes = [new_index() for _ in range(batch)]

    def continue_rows(self, sources: list[int]) -> None:
        """Row ``j`` now continues old row ``sources[j]`` (beam search): its index, or a copy where a row is
        continued twice, since the rows' stores grow apart from here."""
        faiss, taken, indexes = _faiss(), set(), []
        for source in sources:
            index = self.indexes[source]
            indexes.append(faiss.clone_index(index) if source in taken else index)
            taken.add(source)
        self.indexes = indexes

    def add(self, keys: torch.Tensor, valid: torch.Tensor) -> None:
        """Index store entries ``indexed ...`` onwards: keys [B, Hkv, n, Dh], valid [B, n] (only kept ones)."""
        vectors = keys.transpose(1, 2).flatten(2).float().cpu().numpy()  # [B, n, Hkv*Dh]
        ids = np.arange(self.indexed, self.indexed + vectors.shape[1], dtype=np.int64)
        for row, index in enumerate(self.indexes):
            kept = valid[row].cpu().numpy()
            if kept.any():
                index.add_with_ids(np.ascontiguousarray(vectors[row][kept]), ids[kept])
        self.indexed += vectors.shape[1]

    def search(self, queries: torch.Tensor, count: int) -> torch.Tensor:
        """Entry numbers [B, count] of the best matches of queries [B, Hkv*Dh] (-1 where a row has fewer)."""
        vectors = queries.float().cpu().numpy()
        if self.kind == "hnsw":
            breadth = max(HNSW_SEARCH_BREADTH, SEARCH_BREADTH_PER_RESULT * count)
            for index in self.indexes:
                _faiss().downcast_index(index.index).hnsw.efSearch = breadth
        found = [index.search(vectors[row : row + 1], count)[1][0] for row, index in enumerate(self.indexes)]
        return torch.as_tensor(np.stack(found), device=queries.device)
