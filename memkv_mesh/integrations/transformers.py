"""Hugging Face transformers: keep a model's ``DynamicCache`` in memkv-mesh, block by block.

Theory of operation
-------------------
* A **block** is one chunk of ``block_tokens`` prompt tokens (default 256) and holds *all* layers'
  K and V for that chunk, laid out as one contiguous C-order array of shape
  ``[layers, 2 (K then V), kv_heads, block_tokens, head_dim]`` in the cache's dtype. Its key is the
  chained key of ``memkv_mesh.keys.block_keys``: block i's key names the whole prefix up to the end
  of chunk i, so two prompts share block i exactly when they share that prefix.
* The **namespace** folds in the model id, the dtype and the KV geometry (layers, KV heads, head
  dim), so blocks of another model or layout can never be restored into this cache; a block whose
  size does not match the geometry is a miss (counted, logged), never reinterpreted.
* ``store`` packs each whole chunk of a filled cache and puts the chunks the daemon lacks (one
  ``put_many``: one copy into shared memory per block). A trailing partial chunk is not stored.
* ``restore`` asks the daemon how many leading blocks it holds (``lookup``), reads them in place
  (``get_many``: zero-copy views pinned by a lease) and copies each layer's slice straight into
  one preallocated tensor per layer, then hands those tensors to a fresh ``DynamicCache``. At least
  one prompt token is always left un-restored, because the model must run on it to produce the
  next-token logits.
* ``prefill`` is what an engine does per request: restore the longest cached prefix, run the
  model on the suffix only, and store the blocks that were new.

Only full-attention decoder layers (``DynamicLayer``) are supported, with batch size 1: a sliding
window or linear-attention layer does not keep the whole prefix, so a prefix block cannot rebuild
it; such caches are refused with an error naming the layer.

Public API: ``KVLayout``, ``CacheStore`` (``statistics()`` -> ``CacheStoreStats``), ``Prefill``,
``layout_of_config``.
"""

from __future__ import annotations

import inspect
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

try:
    import torch
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(
        "memkv_mesh.integrations.transformers needs torch and transformers: "
        "pip install 'memkv-mesh[transformers]' (torch's CPU build is enough)"
    ) from e

from memkv_mesh.client import Client
from memkv_mesh.keys import block_keys, namespace

__all__ = ["CacheStore", "CacheStoreStats", "KVLayout", "Prefill", "layout_of_config"]

log = logging.getLogger("memkv_mesh.integrations.transformers")

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


@dataclass(frozen=True)
class KVLayout:
    """The geometry of one sequence's KV cache: what a block's bytes mean."""

    layers: int
    kv_heads: int
    head_dim: int
    dtype: torch.dtype

    def __post_init__(self) -> None:
        for name in ("layers", "kv_heads", "head_dim"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"KVLayout.{name} must be a positive int, got {v!r}")
        if self.dtype not in _DTYPES.values():
            raise ValueError(f"KVLayout.dtype must be one of {sorted(_DTYPES)}, got {self.dtype}")

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    @property
    def itemsize(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    def token_bytes(self) -> int:
        """KV bytes of one token across all layers (K and V)."""
        return self.layers * 2 * self.kv_heads * self.head_dim * self.itemsize

    def block_shape(self, block_tokens: int) -> tuple[int, int, int, int, int]:
        return (self.layers, 2, self.kv_heads, block_tokens, self.head_dim)

    def block_bytes(self, block_tokens: int) -> int:
        return self.token_bytes() * block_tokens

    def tag(self) -> str:
        """The layout as it enters the namespace."""
        return f"L{self.layers}:kv{self.kv_heads}x{self.head_dim}"


def layout_of_config(config: Any, dtype: torch.dtype | None = None) -> KVLayout:
    """The KV layout of a decoder config (``LlamaConfig`` and friends)."""
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    try:
        layers = int(text.num_hidden_layers)
        heads = int(text.num_attention_heads)
    except AttributeError as e:
        raise ValueError(f"config {type(config).__name__} has no {e.name}; cannot derive its KV layout") from None
    kv_heads = int(getattr(text, "num_key_value_heads", None) or heads)
    head_dim = getattr(text, "head_dim", None) or int(text.hidden_size) // heads
    if dtype is None:
        dtype = getattr(text, "dtype", None) or getattr(text, "torch_dtype", None) or torch.float32
        if isinstance(dtype, str):
            if dtype not in _DTYPES:
                raise ValueError(f"config dtype {dtype!r} is not one of {sorted(_DTYPES)}")
            dtype = _DTYPES[dtype]
    layer_types = getattr(text, "layer_types", None)
    if layer_types:
        for i, t in enumerate(layer_types):
            if t != "full_attention":
                raise ValueError(
                    f"layer {i} is {t!r}: only full-attention layers keep the whole prefix, so "
                    "prefix blocks cannot rebuild this model's cache"
                )
    assert isinstance(dtype, torch.dtype)
    return KVLayout(layers, kv_heads, int(head_dim), dtype)


@dataclass(frozen=True)
class CacheStoreStats:
    """``CacheStore.statistics()``: counts since the store was made."""

    stored_blocks: int  # blocks put that the daemon did not hold
    restored_blocks: int  # blocks read back into caches
    restored_tokens: int  # prompt tokens whose KV was restored
    bad_blocks: int  # blocks refused because their size did not match the layout (treated as misses)


@dataclass(frozen=True)
class Prefill:
    """What ``CacheStore.prefill`` did for one prompt."""

    logits: torch.Tensor  # next-token logits, shape [vocab]
    cache: Any  # the DynamicCache, filled for the whole prompt
    restored_tokens: int  # prompt tokens whose KV came from memkv-mesh
    computed_tokens: int  # prompt tokens the model ran on
    stored_blocks: int  # blocks this call put that the daemon did not hold


def _forward_kwarg(model: Any) -> str:
    """transformers >= 5 calls the cache argument ``cache``; earlier ones ``past_key_values``."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _layer_tensors(cache: Any, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    lay = cache.layers[layer]
    if type(lay) is not DynamicLayer:
        raise ValueError(
            f"cache layer {layer} is {type(lay).__name__}; only full-attention DynamicLayer caches "
            "can be stored as prefix blocks"
        )
    keys, values = lay.keys, lay.values
    if not getattr(lay, "is_initialized", True) or keys is None or values is None or keys.numel() == 0:
        raise ValueError(f"cache layer {layer} is empty")
    return keys, values


class CacheStore:
    """Store and restore one model's ``DynamicCache`` through a node daemon's ``Client``.

    ``model_id`` names the weights (e.g. the Hub id and revision); together with ``layout`` and
    ``tenant`` it makes the namespace. ``block_tokens`` must match across every process that
    shares blocks (it is part of what a key means).
    """

    def __init__(
        self,
        client: Client,
        model_id: str,
        layout: KVLayout,
        *,
        block_tokens: int = 256,
        tenant: str = "",
    ) -> None:
        if not isinstance(block_tokens, int) or block_tokens < 1:
            raise ValueError(f"block_tokens must be a positive int, got {block_tokens!r}")
        if layout.block_bytes(block_tokens) > client.max_block_bytes:
            raise ValueError(
                f"a block of {block_tokens} tokens is {layout.block_bytes(block_tokens)} bytes; the daemon "
                f"accepts at most {client.max_block_bytes} (store.max_block_bytes): lower block_tokens"
            )
        self.client = client
        self.layout = layout
        self.block_tokens = block_tokens
        self.ns = namespace(model_id, dtype=layout.dtype_name, layers=layout.tag(), tenant=tenant)
        self._stored_blocks = 0
        self._restored_blocks = 0
        self._restored_tokens = 0
        self._bad_blocks = 0

    @classmethod
    def for_model(cls, client: Client, model: Any, model_id: str, **kw: Any) -> CacheStore:
        """A store for ``model`` (its config gives the layout, its parameters the dtype)."""
        dtype = next(model.parameters()).dtype
        return cls(client, model_id, layout_of_config(model.config, dtype), **kw)

    # ---- keys ------------------------------------------------------------------------------------
    def keys(self, tokens: Sequence[int] | np.ndarray | torch.Tensor) -> list[bytes]:
        """The block keys of every whole chunk of ``tokens``."""
        return block_keys(_token_array(tokens), self.ns, block_tokens=self.block_tokens)

    def cached_tokens(self, tokens: Sequence[int] | np.ndarray | torch.Tensor) -> int:
        """How many leading tokens of ``tokens`` the daemon holds KV for (a multiple of block_tokens)."""
        keys = self.keys(tokens)
        return self.client.lookup(keys) * self.block_tokens if keys else 0

    # ---- store -----------------------------------------------------------------------------------
    def _check_cache(self, cache: Any) -> None:
        n = len(cache.layers)
        if n != self.layout.layers:
            raise ValueError(f"cache has {n} layers; the layout says {self.layout.layers}")
        k, _ = _layer_tensors(cache, 0)
        want = (1, self.layout.kv_heads, self.layout.head_dim)
        got = (k.shape[0], k.shape[1], k.shape[3])
        if k.dim() != 4 or got != want:
            raise ValueError(
                f"cache layer 0 has shape {tuple(k.shape)}; expected [1, {self.layout.kv_heads}, seq, "
                f"{self.layout.head_dim}] (batch size 1)"
            )
        if k.dtype != self.layout.dtype:
            raise ValueError(f"cache dtype is {k.dtype}; the layout says {self.layout.dtype}")

    def pack_block(self, cache: Any, index: int) -> torch.Tensor:
        """Block ``index`` of ``cache`` as one contiguous CPU tensor of ``layout.block_shape``."""
        bt = self.block_tokens
        s, e = index * bt, (index + 1) * bt
        out = torch.empty(self.layout.block_shape(bt), dtype=self.layout.dtype)
        for li in range(self.layout.layers):
            k, v = _layer_tensors(cache, li)
            if k.shape[2] < e:
                raise ValueError(f"cache layer {li} holds {k.shape[2]} tokens; block {index} needs {e}")
            out[li, 0].copy_(k[0, :, s:e, :])
            out[li, 1].copy_(v[0, :, s:e, :])
        return out

    def store(self, tokens: Sequence[int] | np.ndarray | torch.Tensor, cache: Any, *, skip_blocks: int = 0) -> int:
        """Put every whole chunk of ``cache`` (which holds KV for ``tokens``) the daemon lacks.

        ``skip_blocks`` leading blocks are known to be stored already (e.g. they were restored) and
        are not packed. Returns how many blocks were new to the daemon.
        """
        self._check_cache(cache)
        keys = self.keys(tokens)
        seq = cache.get_seq_length()
        n = min(len(keys), seq // self.block_tokens)
        if n <= skip_blocks:
            return 0
        todo = list(range(skip_blocks, n))
        present = self.client.contains([keys[i] for i in todo])
        todo = [i for i, p in zip(todo, present, strict=True) if not p]
        if not todo:
            return 0
        blocks = [self.pack_block(cache, i).numpy() for i in todo]
        n = self.client.put_many([keys[i] for i in todo], blocks)
        self._stored_blocks += n
        return n

    # ---- restore ---------------------------------------------------------------------------------
    def restore(
        self,
        tokens: Sequence[int] | np.ndarray | torch.Tensor,
        cache: Any | None = None,
        *,
        config: Any = None,
        max_tokens: int | None = None,
        device: torch.device | str | None = None,
    ) -> tuple[Any, int]:
        """Fill a fresh cache with the longest cached prefix of ``tokens``.

        Returns ``(cache, restored_tokens)``. ``max_tokens`` caps what is restored (default:
        ``len(tokens) - 1``, so the model still runs on the last token). ``cache`` must be empty;
        without one a ``DynamicCache(config=config)`` is made. The tensors are filled in host
        memory and moved to ``device`` (the model's) if that is not the CPU. A block that vanished
        between the lookup and the read ends the prefix there (a miss, never wrong bytes).
        """
        arr = _token_array(tokens)
        if cache is None:
            cache = DynamicCache(config=config) if config is not None else DynamicCache()
        elif cache.get_seq_length() != 0:
            raise ValueError(f"restore needs an empty cache; this one holds {cache.get_seq_length()} tokens")
        limit = len(arr) - 1 if max_tokens is None else min(max_tokens, len(arr))
        if limit <= 0:
            return cache, 0
        keys = self.keys(arr)[: math.ceil(limit / self.block_tokens)]
        if not keys:
            return cache, 0
        hit = self.client.lookup(keys)
        if hit == 0:
            return cache, 0
        lay, bt = self.layout, self.block_tokens
        with self.client.get_many(keys[:hit]) as lease:
            views = lease.views
            want = lay.block_bytes(bt)
            got = 0
            for v in views:
                if v is None:
                    break  # evicted between the lookup and the get: the prefix ends here
                if v.nbytes != want:
                    self._bad_blocks += 1
                    log.warning(
                        "block %d of this prompt is %d bytes; layout %s %s with %d tokens per block needs %d: "
                        "treating it as a miss", got, v.nbytes, lay.tag(), lay.dtype_name, bt, want,
                    )  # fmt: skip
                    break
                got += 1
            ntok = min(got * bt, limit)
            if ntok == 0:
                return cache, 0
            ks = [torch.empty((1, lay.kv_heads, ntok, lay.head_dim), dtype=lay.dtype) for _ in range(lay.layers)]
            vs = [torch.empty((1, lay.kv_heads, ntok, lay.head_dim), dtype=lay.dtype) for _ in range(lay.layers)]
            # Copy with numpy on same-width integer views: it reads the read-only arena view
            # without a warning, handles bfloat16 bits as they are, and releases the GIL.
            raw = _RAW[lay.itemsize]
            kn = [_raw_numpy(t, raw)[0] for t in ks]
            vn = [_raw_numpy(t, raw)[0] for t in vs]
            for b in range(math.ceil(ntok / bt)):
                view = views[b]
                assert view is not None
                blk = np.frombuffer(view, dtype=raw).reshape(lay.block_shape(bt))
                s = b * bt
                e = min(s + bt, ntok)
                for li in range(lay.layers):
                    np.copyto(kn[li][:, s:e, :], blk[li, 0, :, : e - s, :])
                    np.copyto(vn[li][:, s:e, :], blk[li, 1, :, : e - s, :])
                del blk
        if device is not None and torch.device(device).type != "cpu":
            ks = [k.to(device, non_blocking=True) for k in ks]
            vs = [v.to(device, non_blocking=True) for v in vs]
        _fill_cache(cache, ks, vs)
        self._check_cache(cache)
        self._restored_blocks += math.ceil(ntok / bt)
        self._restored_tokens += ntok
        return cache, ntok

    def statistics(self) -> CacheStoreStats:
        """A snapshot of what this store has done."""
        return CacheStoreStats(
            stored_blocks=self._stored_blocks,
            restored_blocks=self._restored_blocks,
            restored_tokens=self._restored_tokens,
            bad_blocks=self._bad_blocks,
        )

    # ---- the whole request -----------------------------------------------------------------------
    @torch.inference_mode()
    def prefill(self, model: Any, tokens: Sequence[int] | np.ndarray | torch.Tensor, *, store: bool = True) -> Prefill:
        """Restore the longest cached prefix, run the model on the rest, store new blocks.

        Returns the next-token logits (float32, shape [vocab]) and the filled cache.
        """
        arr = _token_array(tokens)
        if len(arr) == 0:
            raise ValueError("prefill needs at least one token")
        device = next(model.parameters()).device
        cache, restored = self.restore(arr, config=model.config, device=device)
        suffix = torch.from_numpy(arr[restored:].astype(np.int64)).unsqueeze(0).to(device)
        out = model(input_ids=suffix, use_cache=True, logits_to_keep=1, **{_forward_kwarg(model): cache})
        new = self.store(arr, cache, skip_blocks=restored // self.block_tokens) if store else 0
        return Prefill(out.logits[0, -1].float(), cache, restored, len(arr) - restored, new)


def _fill_cache(cache: Any, ks: list[torch.Tensor], vs: list[torch.Tensor]) -> None:
    """Hand the restored tensors to an empty cache.

    ``DynamicLayer.update`` would concatenate them onto an empty tensor, a second full copy of
    the prefix; a layer made from the model config takes them as they are instead (the same
    state ``update`` leaves). A cache without layers yet gets them through ``update``.
    """
    if len(cache.layers) == len(ks) and all(type(layer) is DynamicLayer for layer in cache.layers):
        for layer, k, v in zip(cache.layers, ks, vs, strict=True):
            layer.lazy_initialization(k, v)
            layer.keys, layer.values = k, v
        return
    for li, (k, v) in enumerate(zip(ks, vs, strict=True)):
        cache.update(k, v, li)


_RAW: dict[int, Any] = {2: np.uint16, 4: np.uint32}
_TORCH_RAW = {2: torch.int16, 4: torch.int32}


def _raw_numpy(t: torch.Tensor, raw: Any) -> np.ndarray:
    """A numpy view of ``t``'s bytes as same-width unsigned integers (shares memory)."""
    return t.view(_TORCH_RAW[t.element_size()]).numpy().view(raw)


def _token_array(tokens: Sequence[int] | np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(tokens, torch.Tensor):
        if tokens.dim() == 2 and tokens.shape[0] == 1:
            tokens = tokens[0]
        if tokens.dim() != 1:
            raise ValueError(f"tokens must be one sequence (shape [n] or [1, n]), got {tuple(tokens.shape)}")
        return tokens.detach().cpu().numpy()
    arr = np.asarray(tokens)
    if arr.ndim != 1:
        raise ValueError(f"tokens must be one sequence, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"token ids must be integers, got dtype {arr.dtype}")
    return arr
