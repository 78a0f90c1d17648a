"""The Gemma layout: Gemma, Gemma 2, and Gemma 3's text model (``Gemma3ForCausalLM``).

The module names are Llama's; what differs::

    Gemma 1    x·√hidden ─ input_layernorm ─ attn ─ o_proj ─(+)─ post_attention_layernorm ─ GeGLU ─ down_proj ─(+)
    Gemma 2/3  x·√hidden ─ input_layernorm ─ attn ─ o_proj ─ post_attention_layernorm ─(+)─
                         pre_feedforward_layernorm ─ GeGLU ─ down_proj ─ post_feedforward_layernorm ─(+)

- ``head_dim`` is its own config field (256 in Gemma 7B with hidden 3072), and the small sizes
  use one key/value head (MQA): there, heads can only be pruned as query heads.
- Gemma 3 normalises each head's queries and keys (``q_norm``/``k_norm``, one weight of
  ``head_dim`` shared by all heads): removing heads leaves them as they are.
- Gemma 2/3 alternate sliding-window and full-attention layers (``config.layer_types``) and
  soft-cap logits; both are config settings that removing layers keeps per layer.
- RMSNorm multiplies by ``1 + w``, and the embeddings by the normaliser ``√hidden_size``.

Hidden channels: the model computes the normaliser from ``config.hidden_size``, so after pruning
it is ``√new`` (and a reload computes that too) instead of the masked model's ``√old``: the
residual stream is ``c = √(new/old)`` times the masked one. llmp keeps it that way throughout:

- a norm that reads the stream (input, pre-MLP, final) sees mean square ``c²·Σx²/new``; with its
  ``1 + w`` multiplied by ``g = √(old/new)`` it outputs ``g·c·x / √(c²·Σx²/new + eps)``, which is
  the masked ``x / √(Σx²/old + eps)`` exactly, ``eps`` unchanged;
- what writes into the stream is scaled by ``c``: ``o_proj`` and ``down_proj``. In Gemma 2/3 they
  feed a post-norm, which then sees ``c·a`` over ``new`` channels, mean square ``Σa²/old``, and
  outputs ``c`` times the masked output with its weight untouched.

So a hidden-pruned Gemma is a plain Gemma config (``hidden_size`` = new, same ``rms_norm_eps``),
exact in exact arithmetic, and plain transformers loads a uniform one.
"""

from __future__ import annotations

from transformers import PreTrainedModel

from llmp.structure.adapters.llama import LlamaAdapter


class GemmaAdapter(LlamaAdapter):
    family = "gemma"
    model_types = ("gemma", "gemma2", "gemma3_text")
    # RMSNorms over the hidden channels, in the order the layer applies them (Gemma 1 has the first two).
    hidden_norms = (
        "input_layernorm",
        "post_attention_layernorm",
        "pre_feedforward_layernorm",
        "post_feedforward_layernorm",
    )

    def rescale_hidden(self, model: PreTrainedModel, old: int, new: int) -> None:
        # See the module docstring; the normaliser itself follows the width in `sync`.
        c, g = (new / old) ** 0.5, (old / new) ** 0.5
        readers = [model.model.norm]
        for layer in self.layers(model):
            ffn_norm = getattr(layer, "pre_feedforward_layernorm", None) or layer.post_attention_layernorm
            readers += [layer.input_layernorm, ffn_norm]
            for module in (layer.self_attn.o_proj, layer.mlp.down_proj):
                module.weight.data.mul_(c)
                if module.bias is not None:
                    module.bias.data.mul_(c)
        for norm in readers:  # eps unchanged: the stream itself is c times the masked one
            norm.weight.data.add_(1.0).mul_(g).sub_(1.0)  # (1 + w)·g = 1 + w'

    def sync(self, model: PreTrainedModel) -> None:
        super().sync(model)
        for i, layer in enumerate(self.layers(model)):
            if hasattr(layer, "layer_idx"):  # Gemma 3 keeps it on the layer as well
                layer.layer_idx = i
        embed = model.model.embed_tokens
        scale = embed.embedding_dim**0.5  # what GemmaModel.__init__ computes from hidden_size
        embed.scalar_embed_scale = scale
        embed.embed_scale.fill_(scale)
