"""Edits of a Hugging Face ``DynamicCache`` after a verify (or draft) forward.

Every layer holds keys/values of shape ``[B, H, S, D]``. Keeping the accepted path of a tree is
an ``index_select`` along S on every layer, written back in place after the kept prefix (EAGLE's
KV compaction); rolling back is a crop.
Sliding-window layers keep extra bookkeeping and are refused rather than silently corrupted.
"""
from __future__ import annotations

from torch import Tensor
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer


def kv_length(cache: DynamicCache) -> int:
    return cache.get_seq_length()


def _full_layers(cache: DynamicCache) -> list[DynamicLayer]:
    for i, layer in enumerate(cache.layers):
        if isinstance(layer, DynamicSlidingWindowLayer) or not isinstance(layer, DynamicLayer):
            raise NotImplementedError(f"cache layer {i} is a {type(layer).__name__}: only full "
                                      "attention DynamicLayer caches can be edited")
    return cache.layers


def kv_keep(cache: DynamicCache, start: int, indices: Tensor) -> None:
    """Keep positions ``[0, start)`` and ``start + indices``; drop the rest of ``[start, S)``.

    indices: # [n] long, increasing offsets from ``start`` (e.g. the root and accepted path)
    """
    length = kv_length(cache)
    if not 0 <= start <= length:
        raise ValueError(f"keep start {start} outside the cache of length {length}")
    offsets = indices.tolist()  # one host read for the check
    if offsets and (min(offsets) < 0 or max(offsets) >= length - start):
        raise ValueError(f"keep indices {offsets} outside [0, {length - start})")
    n = len(indices)
    for layer in _full_layers(cache):
        if layer.keys is None or not layer.is_initialized:
            continue
        idx = start + indices.to(layer.keys.device)
        # gather the kept entries, write them right after the prefix, then drop the tail
        for name in ("keys", "values"):
            full = getattr(layer, name)  # [B, H, S, D]
            full[..., start:start + n, :] = full.index_select(-2, idx)
            setattr(layer, name, full[..., :start + n, :])


def kv_crop(cache: DynamicCache, length: int) -> None:
    """Drop every position from ``length`` on."""
    current = kv_length(cache)
    if not 0 <= length <= current:
        raise ValueError(f"cannot crop a cache of length {current} to {length}")
    for layer in _full_layers(cache):
        if layer.keys is None or not layer.is_initialized:
            continue
        layer.keys = layer.keys[..., :length, :]
        layer.values = layer.values[..., :length, :]
