"""ALiBi after head pruning: every layer keeps the slopes of the heads it kept.

ALiBi families (BLOOM, Falcon-RW, Baichuan-13B) build one position bias for all layers from the
config's head count ``n``; head ``h`` gets slope ``m_h`` (a geometric series that depends on
``n``). Once layers keep different heads, layer ``i`` must see the slopes of *its* heads::

    model-level bias [batch, n, 1, kv]  (built from config.n_head, which llmp leaves alone)
        └─ layer i, forward pre-hook: bias[:, kept_i]  →  [batch, len(kept_i), 1, kv]

Picking rows of the model's own bias (instead of recomputing slopes) gives bit-identical values
in every dtype. ``config.llmp_alibi_heads`` holds each layer's kept original head indices, so a
saved folder loads back right; :func:`install` copies them into a non-persistent buffer of each
attention module (it follows ``.to(device)``) and registers the hook once.

A plain loader that reads only ``n_head`` would recompute slopes for ``len(kept)`` heads, which are
different numbers: a folder with pruned ALiBi heads never claims to load with plain transformers.
"""

from __future__ import annotations

import torch
from torch import nn

KEY = "llmp_alibi_heads"


def kept_heads(config, n_layers: int, n_heads: int) -> list[list[int]]:
    """Each layer's kept original head indices (all heads when nothing was pruned yet)."""
    kept = getattr(config, KEY, None)
    return [list(k) for k in kept] if kept is not None else [list(range(n_heads)) for _ in range(n_layers)]


def note_heads_removed(config, n_layers: int, n_heads: int, layer: int, removed: list[int]) -> None:
    """Record that layer ``layer`` loses its current heads ``removed`` (positions, not original ids)."""
    kept = kept_heads(config, n_layers, n_heads)
    gone = set(removed)
    kept[layer] = [h for j, h in enumerate(kept[layer]) if j not in gone]
    setattr(config, KEY, kept)


def note_layers_kept(config, n_layers: int, n_heads: int, keep: list[int]) -> None:
    """Record that only decoder layers ``keep`` (old indices, in order) remain."""
    if getattr(config, KEY, None) is not None:
        kept = kept_heads(config, n_layers, n_heads)
        setattr(config, KEY, [kept[i] for i in keep])


def is_identity(config, n_heads: int) -> bool:
    kept = getattr(config, KEY, None)
    return kept is None or all(k == list(range(n_heads)) for k in kept)


def install(attentions: list[nn.Module], config, n_heads: int) -> None:
    """Give every attention module its kept heads and the pre-hook that selects their bias."""
    for attn, heads in zip(attentions, kept_heads(config, len(attentions), n_heads), strict=True):
        device = next(attn.parameters()).device
        attn.register_buffer(KEY, torch.tensor(heads, dtype=torch.long, device=device), persistent=False)
        attn.llmp_alibi_total = n_heads
        if not any(h is _select_heads for h in attn._forward_pre_hooks.values()):
            attn.register_forward_pre_hook(_select_heads, with_kwargs=True)


def _select_heads(module: nn.Module, args: tuple, kwargs: dict):
    """Keep the rows of the model-level ALiBi bias (and of a mask that carries it) of this layer's heads."""
    heads, total = getattr(module, KEY), module.llmp_alibi_total
    if heads.numel() == total:
        return None
    alibi = kwargs.get("alibi")
    if isinstance(alibi, torch.Tensor):
        heads = heads.to(alibi.device)
        if alibi.dim() == 4:  # [batch, total, 1, kv] (Falcon, when it folds the bias into its mask)
            kwargs["alibi"] = alibi.index_select(1, heads)
        else:  # [batch * total, 1, kv] (BLOOM, Falcon)
            kwargs["alibi"] = alibi.unflatten(0, (-1, total)).index_select(1, heads).flatten(0, 1)
    mask = kwargs.get("attention_mask")
    if isinstance(mask, torch.Tensor) and mask.dim() >= 3 and mask.shape[-3] == total:
        # Falcon folds the bias into its 4-D mask; Baichuan-13B's mask *is* the bias ([n, q, kv]).
        kwargs["attention_mask"] = mask.index_select(mask.dim() - 3, heads.to(mask.device))
    return args, kwargs
