"""Building blocks of sparse decode (used by ``TieredKVCache``'s sparse mode, see :mod:`tiercache_llm.sparse_layer`).

- :mod:`.digests`: Quest-style per-page key min/max digests (upper bounds of q·k) and key sums
  (landmarks), incremental.
- :mod:`.selection`: page scoring, sink/recent forcing, per-row token budgets, per-KV-head selection
  and the union of storage blocks to fetch.
- :mod:`.attention`: decode attention over selected blocks (torch reference and block-table form),
  returning the attention mass per block.

See docs/sparse.md.
"""

from .attention import SparseAttentionOutput, paged_decode_attention, paged_decode_attention_reference, sparse_attention_reference
from .digests import KeyDigests, block_digests
from .selection import (
    BlockSelection,
    SelectionConfig,
    block_table,
    forced_blocks,
    score_blocks,
    score_blocks_landmark,
    score_blocks_reference,
    select,
    select_blocks,
    token_budget,
)

__all__ = [
    "BlockSelection",
    "KeyDigests",
    "SelectionConfig",
    "SparseAttentionOutput",
    "block_digests",
    "block_table",
    "forced_blocks",
    "paged_decode_attention",
    "paged_decode_attention_reference",
    "score_blocks",
    "score_blocks_landmark",
    "score_blocks_reference",
    "select",
    "select_blocks",
    "sparse_attention_reference",
    "token_budget",
]
