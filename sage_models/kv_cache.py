"""The key/value cache the hf backend generates with: the rows' cached prefixes (``HFPolicy``'s reuse across
turns) left-padded into one batch, in layers that grow in steps instead of at every token.

transformers' ``DynamicLayer`` concatenates each new key onto the whole cache, copying all of it at every
generated token: with 8 rows of 2-3k cached tokens that copy is as large as the attention's own reads.
``GrowingLayer`` writes in place (as a ``StaticLayer``) into a buffer with room for the turn's response and
copies only when it must grow (by ``CACHE_STEP`` positions); attention reads the whole buffer with the free
positions masked out. Models with sliding-window, recurrent or shared layers keep a ``DynamicCache``.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import Cache, StaticLayer, get_layer_types_and_kwargs

CACHE_STEP = 256  # positions a generation cache grows by when it is full


class GrowingLayer(StaticLayer):
    """A key/value cache layer with room for ``capacity`` positions that grows by ``CACHE_STEP`` when full.

    Like a ``StaticLayer`` it is "compileable", so ``generate`` builds the 4D attention mask over the whole
    buffer (an all-ones 2D mask would otherwise be skipped and the free positions attended to); the caller
    passes ``disable_compile=True``, as the layer changes shape when it grows."""

    def __init__(self, capacity: int):
        super().__init__(max_cache_len=capacity)
        self.length = 0  # positions written (cumulative_length without a device sync)

    def _capacity(self, new: int) -> int:
        needed = self.length + new
        return self.max_cache_len if needed <= self.max_cache_len else needed + CACHE_STEP

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        batch, heads = key_states.shape[:2]
        self.keys = key_states.new_zeros((batch, heads, self.max_cache_len, key_states.shape[-1]))
        self.values = value_states.new_zeros((batch, heads, self.max_cache_len, value_states.shape[-1]))
        self.device, self.batch_size, self.num_heads = key_states.device, batch, heads
        self.cumulative_length = self.cumulative_length.to(key_states.device)
        self.is_initialized = True

    def fill(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Start from ``keys``/``values`` [B, kv_heads, length, head_dim] (the rows' cached prefixes)."""
        self.lazy_initialization(keys, values)
        self.keys[:, :, :keys.shape[2]], self.values[:, :, :keys.shape[2]] = keys, values
        self.length = keys.shape[2]
        self.cumulative_length.fill_(self.length)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        capacity = self._capacity(key_states.shape[-2])
        if self.is_initialized and capacity > self.max_cache_len:
            shape = (*self.keys.shape[:2], capacity - self.max_cache_len)
            self.keys = torch.cat([self.keys, self.keys.new_zeros((*shape, self.keys.shape[-1]))], dim=2)
            self.values = torch.cat([self.values, self.values.new_zeros((*shape, self.values.shape[-1]))], dim=2)
        self.max_cache_len = capacity
        self.length += key_states.shape[-2]
        return super().update(key_states, value_states, *args, **kwargs)

    def get_mask_sizes(self, query_length: int, *args, **kwargs) -> tuple[int, int]:
        return self._capacity(query_length), 0  # the buffer this step's update writes into


def full_attention(config) -> bool:
    """Whether every layer keeps a plain key/value cache of every position (no sliding window, recurrent or
    shared layers)."""
    try:
        types, _ = get_layer_types_and_kwargs(config.get_text_config(decoder=True))
    except (AttributeError, TypeError, ValueError, KeyError):
        return False
    return bool(types) and all(t == "full_attention" for t in types)


def batch_cache(caches: list, width: int, config, room: int) -> Cache | None:
    """The rows' caches (``length`` and per-layer (keys, values) [kv_heads, length, head_dim], or None) left-padded
    with masked zeros to ``width`` positions, as one cache for ``generate``: ``GrowingLayer``s with ``room`` more
    positions for a full-attention model, else a ``DynamicCache`` (None when no row has a cache: generate makes one)."""
    data = []
    some = next((c for c in caches if c is not None), None)
    for layer, (k0, v0) in enumerate(some.layers if some is not None else []):
        keys = k0.new_zeros((len(caches), k0.shape[0], width, k0.shape[2]))
        values = v0.new_zeros((len(caches), v0.shape[0], width, v0.shape[2]))
        for j, c in enumerate(caches):
            if c is not None:
                keys[j, :, width - c.length:], values[j, :, width - c.length:] = c.layers[layer]
        data.append((keys, values))
    if not full_attention(config):
        return DynamicCache(ddp_cache_data=data, config=config) if data else None
    n_layers = len(get_layer_types_and_kwargs(config.get_text_config(decoder=True))[0])
    layers = [GrowingLayer(width + room) for _ in range(n_layers)]
    for layer, (keys, values) in zip(layers, data):
        layer.fill(keys, values)
    return Cache(layers=layers)


def cache_layers(output, fed: int) -> list[tuple[Any, Any]] | None:
    """(keys, values) [B, kv_heads, fed, head_dim] per layer of ``generate``'s returned cache, or None when it is not a
    full cache of every fed position (sliding-window or recurrent layers): then nothing is reused."""
    cache = getattr(output, "cache", None) or getattr(output, "past_key_values", None)
    layers = getattr(cache, "layers", None)
    if not layers or any(getattr(layer, "keys", None) is None or getattr(layer, "is_sliding", False)
                         or getattr(layer, "length", layer.keys.shape[-2]) != fed for layer in layers):
        return None
    return [(layer.keys[:, :, :fed], layer.values[:, :, :fed]) for layer in layers]
