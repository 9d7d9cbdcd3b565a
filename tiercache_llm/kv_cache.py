"""``TieredKVCache``: a transformers ``Cache`` whose K/V blocks live in a :class:`tiercache.Cache`.

Plug it into ``generate``::

    cache = TieredKVCache(model.config, host="1GiB", disk="16GiB", path="/nvme/kv")
    out = model.generate(input_ids, past_key_values=cache, max_new_tokens=256)

Exact mode (the only mode so far): every forward pass attends over every block, so greedy decoding is
token-identical to ``DynamicCache``.  See ``docs/tiercache_llm.md`` for the block layout, budgets
and statistics.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from typing import Any, Literal

import torch
from transformers import PretrainedConfig
from transformers.cache_utils import Cache, CacheLayerMixin

from .blocks import BlockRef, block_key, split_full_blocks
from .errors import UnsupportedModelError
from .store import BlockStore

SUPPORTED_TRANSFORMERS = ">=5.17,<6"
_UNSET: Any = object()


@dataclass(frozen=True)
class TieredKVSettings:
    """How a :class:`TieredKVCache` cuts and stores K/V.

    Attributes:
        block_size: tokens per stored block (> 0).  Smaller blocks waste less tail memory and move
            in finer units; larger blocks mean fewer tiercache entries and larger transfers.
        mode: ``"exact"`` (attention over every block).  ``"sparse"`` is planned, not implemented.
        gpu, host, disk: tier budgets (bytes or strings like ``"512MiB"``; ``None``/0 disables the
            tier).  Ignored when an existing ``tiercache.Cache`` is passed to the cache.
        path: directory of the disk tier.  ``None`` with a disk budget: a temporary directory that
            :meth:`TieredKVCache.close` removes.
        policy: tiercache placement policy: ``"kv-stream"`` (default,
            :class:`~tiercache_llm.policies.StreamingKVPolicy`: no promotion, oldest blocks demoted
            first), or any tiercache policy (``"lru"``, ``"lfu"``, ``"score"``, a Policy object).
        compression: tiercache compression codec for the disk tier (``None``: none).
        prefetch: after a layer fetches its blocks, ask the tiercache to stage the next layer's
            blocks (the next step's layer 0 after the last layer) while this layer computes.  Off
            by default: tiercache's prefetch promotes into the fastest tier, which in exact mode
            with a fast tier smaller than the context demotes blocks the next layers need.
    """

    block_size: int = 64
    mode: Literal["exact"] = "exact"
    gpu: int | str | None = None
    host: int | str | None = "4GiB"
    disk: int | str | None = None
    path: str | os.PathLike | None = None
    policy: Any = "kv-stream"
    compression: str | None = None
    prefetch: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, int):
            raise TypeError(f"block_size must be an int, not {type(self.block_size).__name__}")
        if self.block_size <= 0:
            raise ValueError(f"block_size must be positive, got {self.block_size}")
        if self.mode == "sparse":
            raise NotImplementedError("sparse (attention-aware) mode is not implemented yet; use mode='exact'")
        if self.mode != "exact":
            raise ValueError(f"mode must be 'exact', got {self.mode!r}")
        if not isinstance(self.prefetch, bool):
            raise TypeError("prefetch must be a bool")


class TieredKVLayer(CacheLayerMixin):
    """One attention layer's K/V, cut into blocks stored in a :class:`BlockStore`.

    Full blocks live in the tiercache; the partially filled tail (``< block_size`` tokens) is kept
    in memory as ``(batch, kv_heads, tail_len, head_dim)`` tensors on the model's device.
    ``update`` returns the keys/values attention must see (all tokens for full attention, the last
    ``sliding_window - 1`` cached tokens plus the new ones for sliding-window layers), bit-identical
    to what ``DynamicLayer`` / ``DynamicSlidingWindowLayer`` return.

    ``keys`` / ``values`` are properties that materialise the cached states (reading every visible
    block); meant for inspection and tests, not for the decode loop.
    """

    is_compileable = False
    is_croppable = True

    def __init__(
        self, store: BlockStore, cache_uid: str, layer_idx: int, block_size: int, sliding_window: int | None = None
    ) -> None:
        # CacheLayerMixin.__init__ assigns self.keys/self.values, which are read-only properties here.
        self.is_initialized = False
        self.store = store
        self.cache_uid = cache_uid
        self.layer_idx = layer_idx
        self.block_size = block_size
        if sliding_window is not None and (not isinstance(sliding_window, int) or sliding_window <= 1):
            raise ValueError(f"sliding_window must be an int > 1 or None, got {sliding_window!r}")
        self.sliding_window = sliding_window
        self.is_sliding = sliding_window is not None
        self._blocks: list[BlockRef] = []
        self._first_pos = 0  # token position where self._blocks[0] starts (sliding layers drop old blocks)
        self._length = 0  # tokens seen (positions), including tokens of dropped blocks
        self._next_serial = 0
        self._tail_k: torch.Tensor | None = None
        self._tail_v: torch.Tensor | None = None
        self.dtype: torch.dtype | None = None
        self.device: torch.device | None = None
        self._batch = 0
        self._shape_k: tuple[int, int] = (0, 0)  # (kv_heads, head_dim)
        self._shape_v: tuple[int, int] = (0, 0)

    def __repr__(self) -> str:
        return (
            f"TieredKVLayer(layer={self.layer_idx}, tokens={self._length}, blocks={len(self._blocks)}, "
            f"tail={0 if self._tail_k is None else self._tail_k.shape[-2]})"
        )

    # --------------------------------------------------------------------------------- helpers
    def _keys_of(self, blocks: list[BlockRef]) -> tuple[list, list]:
        return (
            [block_key(self.cache_uid, self.layer_idx, "k", b.serial) for b in blocks],
            [block_key(self.cache_uid, self.layer_idx, "v", b.serial) for b in blocks],
        )

    def _tail_start(self) -> int:
        return self._first_pos + len(self._blocks) * self.block_size

    def _visible_start(self, length: int) -> int:
        """First position attention sees besides new tokens, for a layer holding ``length`` tokens."""
        if self.sliding_window is None:
            return 0
        return max(0, length - (self.sliding_window - 1))

    def _first_visible_block(self) -> int:
        start = self._visible_start(self._length)
        return min(len(self._blocks), max(0, (start - self._first_pos) // self.block_size))

    def _fetch(self, blocks: list[BlockRef]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        kkeys, vkeys = self._keys_of(blocks)
        tensors = self.store.get_blocks(kkeys + vkeys, device=self.device)
        n = len(blocks)
        ks = [b.view(t) for b, t in zip(blocks, tensors[:n])]
        vs = [b.view(t) for b, t in zip(blocks, tensors[n:])]
        return ks, vs

    def _past_states(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The cached states attention sees (visible blocks + tail), fetched from the tiers."""
        first = self._first_visible_block()
        start = self._visible_start(self._length)
        needed = self._blocks[first:]
        ks, vs = self._fetch(needed)
        keys = torch.cat([*ks, self._tail_k], dim=-2) if ks else self._tail_k
        values = torch.cat([*vs, self._tail_v], dim=-2) if vs else self._tail_v
        offset = start - (self._first_pos + first * self.block_size)
        if offset > 0:
            keys, values = keys[..., offset:, :], values[..., offset:, :]
        return keys, values

    def _new_serial(self) -> int:
        serial = self._next_serial
        self._next_serial += 1
        return serial

    def _store_blocks(self, kblocks: list[torch.Tensor], vblocks: list[torch.Tensor]) -> list[BlockRef]:
        refs, items = [], []
        for kb, vb in zip(kblocks, vblocks):
            ref = BlockRef(
                serial=self._new_serial(),
                stored_batch=kb.shape[0],
                nbytes=kb.numel() * kb.element_size() + vb.numel() * vb.element_size(),
            )
            items.append((block_key(self.cache_uid, self.layer_idx, "k", ref.serial), kb))
            items.append((block_key(self.cache_uid, self.layer_idx, "v", ref.serial), vb))
            refs.append(ref)
        self.store.put_blocks(items)
        return refs

    def _delete(self, blocks: list[BlockRef]) -> None:
        if blocks:
            kkeys, vkeys = self._keys_of(blocks)
            self.store.delete_blocks(kkeys + vkeys)

    def _drop_expired(self) -> None:
        """Sliding-window layers: delete blocks no future step can see."""
        if self.sliding_window is None:
            return
        start = self._visible_start(self._length)
        n_expired = max(0, (start - self._first_pos) // self.block_size)
        if n_expired:
            expired, self._blocks = self._blocks[:n_expired], self._blocks[n_expired:]
            self._first_pos += n_expired * self.block_size
            self._delete(expired)

    # ----------------------------------------------------------------------------- the contract
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        if key_states.dim() != 4 or value_states.dim() != 4:
            raise ValueError(
                "TieredKVCache expects key/value states of shape (batch, kv_heads, seq, head_dim), got "
                f"{tuple(key_states.shape)} and {tuple(value_states.shape)}"
            )
        if key_states.shape[0] != value_states.shape[0] or key_states.shape[2] != value_states.shape[2]:
            raise ValueError(
                f"key and value states disagree on batch or sequence: {tuple(key_states.shape)} vs "
                f"{tuple(value_states.shape)}"
            )
        self.dtype, self.device = key_states.dtype, key_states.device
        self._batch = key_states.shape[0]
        self._shape_k = (key_states.shape[1], key_states.shape[3])
        self._shape_v = (value_states.shape[1], value_states.shape[3])
        self._tail_k = key_states.new_empty((self._batch, *self._shape_k[:1], 0, self._shape_k[1]))
        self._tail_v = value_states.new_empty((self._batch, *self._shape_v[:1], 0, self._shape_v[1]))
        self.is_initialized = True

    def _check_states(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        expected_k = (self._batch, self._shape_k[0], key_states.shape[2], self._shape_k[1])
        expected_v = (self._batch, self._shape_v[0], key_states.shape[2], self._shape_v[1])
        if tuple(key_states.shape) != expected_k or tuple(value_states.shape) != expected_v:
            raise ValueError(
                f"layer {self.layer_idx}: states of shape {tuple(key_states.shape)}/{tuple(value_states.shape)} do "
                f"not match the cache ({expected_k}/{expected_v}); batch size, heads and head_dim must not change "
                "between updates (use batch_select_indices / batch_repeat_interleave to change the batch)"
            )
        if key_states.dtype != self.dtype or value_states.dtype != self.dtype:
            raise ValueError(f"layer {self.layer_idx}: dtype changed from {self.dtype} to {key_states.dtype}")

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append new (post-RoPE) states and return what attention must see.

        Full attention: every cached token followed by the new ones.  Sliding window ``W``: the last
        ``W - 1`` cached tokens followed by all new ones (the mask restricts further), as
        ``DynamicSlidingWindowLayer`` does.  New full blocks are written to the tiercache.
        """
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self._check_states(key_states, value_states)
        past_k, past_v = self._past_states()
        out_k = torch.cat([past_k, key_states], dim=-2)
        out_v = torch.cat([past_v, value_states], dim=-2)

        # Extend the tail and move every completed block into the tiercache.
        tail_k = torch.cat([self._tail_k, key_states], dim=-2)
        tail_v = torch.cat([self._tail_v, value_states], dim=-2)
        kblocks, new_tail_k = split_full_blocks(tail_k, self.block_size)
        vblocks, new_tail_v = split_full_blocks(tail_v, self.block_size)
        if kblocks:
            self._blocks.extend(self._store_blocks(kblocks, vblocks))
        self._tail_k, self._tail_v = new_tail_k, new_tail_v
        self._length += key_states.shape[-2]
        self._drop_expired()
        return out_k, out_v

    def get_seq_length(self) -> int:
        """Tokens processed so far (for sliding layers: including tokens that left the window)."""
        return self._length

    def get_mask_sizes(self, query_length: int | torch.Tensor) -> tuple[int, int]:
        """``(kv_length, kv_offset)`` of the states ``update`` will return for ``query_length`` new tokens."""
        if isinstance(query_length, torch.Tensor):  # older 5.x releases passed cache_position
            query_length = int(query_length.shape[0])
        if self.sliding_window is None:
            return self._length + query_length, 0
        kv_offset = max(self._length - self.sliding_window + 1, 0)
        if self._length >= self.sliding_window:
            return self.sliding_window - 1 + query_length, kv_offset
        return self._length + query_length, kv_offset

    def get_max_length(self) -> int:
        return -1 if self.sliding_window is None else self.sliding_window

    @property
    def keys(self) -> torch.Tensor | None:
        """Cached keys attention would see next (materialised from the tiers), or ``None`` before the
        first update."""
        return self._past_states()[0] if self.is_initialized else None

    @property
    def values(self) -> torch.Tensor | None:
        """Cached values attention would see next (materialised from the tiers), or ``None``."""
        return self._past_states()[1] if self.is_initialized else None

    def offload(self) -> None:
        """No-op: blocks already live in the tiercache; the tail is a fraction of one block."""

    def prefetch(self) -> None:
        """Ask the tiercache to stage this layer's visible blocks toward its fastest tier."""
        if not self.is_initialized or not self._blocks:
            return
        first = self._first_visible_block()
        kkeys, vkeys = self._keys_of(self._blocks[first:])
        self.store.prefetch(kkeys + vkeys)

    def reset(self) -> None:
        """Delete every stored block and forget the states (the layer re-initialises on next update)."""
        self._delete(self._blocks)
        self._blocks = []
        self._first_pos = 0
        self._length = 0
        self._tail_k = self._tail_v = None
        self.is_initialized = False

    def crop(self, tokens_to_remove: int) -> None:
        """Remove the last ``-tokens_to_remove`` tokens (transformers >= 5.17 passes a negative count;
        a positive value raises ``ValueError`` like ``DynamicLayer``).  Blocks past the new end are
        deleted; the block holding the new end is fetched back and becomes the in-memory tail."""
        if tokens_to_remove > 0:
            raise ValueError(
                f"Calling `crop` with a positive value (`{tokens_to_remove}`) is not supported. "
                "Please use a negative integer to remove that number of tokens from the cache instead."
            )
        if tokens_to_remove == 0 or not self.is_initialized:
            return
        if self.sliding_window is not None and self._length >= self.sliding_window:
            raise RuntimeError(
                f"layer {self.layer_idx}: cannot crop a sliding-window layer ({self.sliding_window}) that already "
                "dropped tokens outside its window; TieredKVCache does not record past states"
            )
        new_length = max(0, self._length - abs(tokens_to_remove))
        n_keep = (new_length - self._first_pos) // self.block_size
        if new_length >= self._tail_start():
            keep = new_length - self._tail_start()
            self._tail_k, self._tail_v = self._tail_k[..., :keep, :].clone(), self._tail_v[..., :keep, :].clone()
        else:
            boundary = self._blocks[n_keep : n_keep + 1]
            keep = new_length - (self._first_pos + n_keep * self.block_size)
            if keep > 0:
                ks, vs = self._fetch(boundary)
                self._tail_k, self._tail_v = ks[0][..., :keep, :].clone(), vs[0][..., :keep, :].clone()
            else:
                self._tail_k, self._tail_v = self._tail_k[..., :0, :], self._tail_v[..., :0, :]
            dropped, self._blocks = self._blocks[n_keep:], self._blocks[:n_keep]
            self._delete(dropped)
        self._length = new_length

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: ``new_row[i] = old_row[beam_idx[i]]``.  Stored blocks are not rewritten; each
        block's row map is composed with ``beam_idx`` (exact, O(batch) per block)."""
        self._gather_rows(beam_idx, compact=False)

    def batch_repeat_interleave(self, repeats: int) -> None:
        """Repeat every batch row ``repeats`` times (row maps only; stored blocks are shared)."""
        if not isinstance(repeats, int) or repeats <= 0:
            raise ValueError(f"repeats must be a positive int, got {repeats!r}")
        if not self.is_initialized:
            return
        index = torch.arange(self._batch, device=self.device).repeat_interleave(repeats)
        self._gather_rows(index, compact=False)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep only the batch rows ``indices`` (long indices or a boolean mask).  Blocks are
        rewritten so the dropped rows stop occupying the tiers."""
        if not self.is_initialized:
            return
        indices = torch.as_tensor(indices, device=self.device)
        if indices.dtype == torch.bool:
            indices = torch.arange(self._batch, device=self.device)[indices]
        self._gather_rows(indices, compact=True)

    def _gather_rows(self, index: torch.Tensor, compact: bool) -> None:
        if not self.is_initialized:
            return
        index = index.to(device=self.device, dtype=torch.long)
        if index.dim() != 1 or (index.numel() and (int(index.min()) < 0 or int(index.max()) >= self._batch)):
            raise IndexError(f"batch indices {index.tolist()} out of range for batch size {self._batch}")
        self._tail_k = self._tail_k.index_select(0, index)
        self._tail_v = self._tail_v.index_select(0, index)
        for block in self._blocks:
            block.compose(index)
        self._batch = index.numel()
        if compact:
            stale = [b for b in self._blocks if b.rows is not None and b.rows.numel() < b.stored_batch]
            if stale:
                ks, vs = self._fetch(stale)
                self._delete(stale)
                stale_ids = {id(b) for b in stale}
                fresh = iter(self._store_blocks(ks, vs))
                self._blocks = [next(fresh) if id(b) in stale_ids else b for b in self._blocks]


def _layer_windows(config: PretrainedConfig) -> list[int | None]:
    """Per decoder layer: ``None`` (full attention) or its sliding window; raises for layer kinds the
    tiered cache cannot reproduce exactly."""
    layer_types = getattr(config, "layer_types", None)
    n_layers = getattr(config, "num_hidden_layers", None)
    if not isinstance(n_layers, int) or n_layers <= 0:
        raise ValueError("the model config has no positive num_hidden_layers")
    sliding = getattr(config, "sliding_window", None)
    if layer_types is None:
        if getattr(config, "attention_chunk_size", None) is not None:
            raise UnsupportedModelError("chunked attention (attention_chunk_size) is not supported by TieredKVCache")
        return [sliding] * n_layers
    windows: list[int | None] = []
    for i, kind in enumerate(layer_types[:n_layers]):
        if kind == "full_attention":
            windows.append(None)
        elif kind == "sliding_attention" and sliding is not None:
            windows.append(sliding)
        else:
            raise UnsupportedModelError(
                f"layer {i} is of type {kind!r}; TieredKVCache supports 'full_attention' and 'sliding_attention' "
                "layers only"
            )
    if getattr(config, "kv_sharing_modes", None) is not None:
        raise UnsupportedModelError("models that share KV between layers are not supported by TieredKVCache")
    return windows


class TieredKVCache(Cache):
    """A ``transformers`` cache that stores K/V in fixed-size token blocks in a tiercache.

    Args:
        config: the model's config (``model.config``); its decoder text config decides the number
            of layers and which are sliding-window layers.
        gpu, host, disk, path, block_size, mode, policy, compression, prefetch: see
            :class:`TieredKVSettings` (defaults: 64-token blocks, exact mode, a 4 GiB host tier, no
            disk tier).
        cache: an existing ``tiercache.Cache`` to store blocks in instead of creating one (then the
            budget arguments must be left out).  A borrowed cache is not closed by :meth:`close`;
            this KV cache's entries are deleted from it.
        settings: a complete :class:`TieredKVSettings` instead of the individual keywords.

    Exact mode returns, for each layer and forward pass, the concatenation of every visible block
    (fetched with one batched ``get_many``) and the in-memory tail, so attention, logits and greedy
    tokens equal ``DynamicCache``'s.  When the tiers cannot hold the context,
    :class:`~tiercache_llm.errors.KVCapacityError` is raised (never a truncated context).

    Use as a context manager or call :meth:`close` to release the tiers (a temporary disk directory
    is removed then).
    """

    def __init__(
        self,
        config: PretrainedConfig,
        *,
        gpu: int | str | None = _UNSET,
        host: int | str | None = _UNSET,
        disk: int | str | None = _UNSET,
        path: str | os.PathLike | None = _UNSET,
        block_size: int = _UNSET,
        mode: str = _UNSET,
        policy: Any = _UNSET,
        compression: str | None = _UNSET,
        prefetch: bool = _UNSET,
        cache: Any = None,
        settings: TieredKVSettings | None = None,
    ) -> None:
        if not isinstance(config, PretrainedConfig):
            raise TypeError(
                f"config must be a transformers PretrainedConfig (pass model.config), not {type(config).__name__}"
            )
        given = {
            name: value
            for name, value in dict(
                gpu=gpu, host=host, disk=disk, path=path, block_size=block_size, mode=mode, policy=policy,
                compression=compression, prefetch=prefetch,
            ).items()
            if value is not _UNSET
        }
        if settings is not None:
            if not isinstance(settings, TieredKVSettings):
                raise TypeError(f"settings must be a TieredKVSettings, not {type(settings).__name__}")
            if given:
                raise ValueError(f"pass either settings or individual options, not both (got {sorted(given)})")
        else:
            settings = TieredKVSettings(**given)
        budget_args = sorted(set(given) & {"gpu", "host", "disk", "path", "policy", "compression"})
        if cache is not None and budget_args:
            raise ValueError(
                f"{budget_args} configure a new tiercache; leave them out when passing an existing cache="
            )
        self.settings = settings
        text_config = config.get_text_config(decoder=True)
        windows = _layer_windows(text_config)
        if cache is not None:
            self.store = BlockStore(cache, owns=False)
        else:
            self.store = BlockStore.open(
                gpu=settings.gpu, host=settings.host, disk=settings.disk, path=settings.path,
                policy=settings.policy, compression=settings.compression,
            )
        self.cache_uid = uuid.uuid4().hex
        layers = [
            TieredKVLayer(self.store, self.cache_uid, i, settings.block_size, sliding_window=w)
            for i, w in enumerate(windows)
        ]
        super().__init__(layers=layers)

    def __repr__(self) -> str:
        return (
            f"TieredKVCache(layers={len(self.layers)}, tokens={self.get_seq_length()}, "
            f"block_size={self.settings.block_size}, held={self.store.held_bytes} B)"
        )

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new states of ``layer_idx`` and return what its attention must see; then start
        staging the next layer's blocks (the next pass's first layer after the last one)."""
        if not 0 <= layer_idx < len(self.layers):
            raise IndexError(f"layer_idx {layer_idx} out of range for a cache of {len(self.layers)} layers")
        keys, values = self.layers[layer_idx].update(key_states, value_states, *args, **kwargs)
        if self.settings.prefetch and len(self.layers) > 1:
            self.layers[(layer_idx + 1) % len(self.layers)].prefetch()
        return keys, values

    @property
    def batch_size(self) -> int:
        """Current batch size, or ``-1`` before the first update."""
        sizes = {layer._batch for layer in self.layers if layer.is_initialized}
        if not sizes:
            return -1
        if len(sizes) > 1:
            raise ValueError(f"The batch size is not consistent across layers: {sorted(sizes)}")
        return sizes.pop()

    def stats(self) -> dict:
        """JSON-serialisable figures: ``{"kv": ..., "tiercache": ...}``.

        ``kv`` holds this cache's own accounting (tokens, blocks, ``held_bytes`` stored in the tiers,
        ``tail_bytes`` kept beside the model, and the :class:`~tiercache_llm.store.KVCounters`);
        ``tiercache`` is ``tiercache.Cache.stats()`` (per-tier capacity, use, hits, misses, bytes
        moved between tiers, evictions).  See docs/tiercache_llm.md.
        """
        out = self.store.stats()
        out["kv"].update(
            tokens=self.get_seq_length() if self.layers else 0,
            layers=len(self.layers),
            block_size=self.settings.block_size,
            blocks=sum(len(layer._blocks) for layer in self.layers),
            tail_bytes=sum(
                0 if layer._tail_k is None else layer._tail_k.nbytes + layer._tail_v.nbytes for layer in self.layers
            ),
        )
        return out

    def close(self) -> None:
        """Release the tiers (idempotent).  The cache cannot be used afterwards."""
        self.store.close()

    def __enter__(self) -> "TieredKVCache":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
