"""What a family adapter tells llmp about one model family, and the loops they all share.

An adapter says only what is its own: where the layers are, which slices make one attention
element and one MLP channel (:meth:`Adapter.attention_group`, :meth:`Adapter.mlp_group`), which
modules read and write the residual stream, and which attributes the forward reads
(:meth:`Adapter.sync`). The base class owns the rest::

    discover        for every layer: attention group, MLP group; then hidden channels, whole layers
    remove_layers   the kept layers' list, config.layer_types in step (keep_layers)
    hidden channels the residual stream's slices from hidden_norms / hidden_readers / hidden_writers,
                    RMSNorm rescaled exactly (rescale_rms), LayerNorm refused (refuse_hidden_layernorm)
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

from torch import nn
from transformers import PreTrainedModel

from llmp.errors import LlmpError
from llmp.structure.groups import Group, Kind, Slice, Structure

BIASES_KEY = "llmp_biases"
"""Config key: the layer modules (``mlp.down_proj``) to which compensation gave a bias."""


class Unsupported(LlmpError, NotImplementedError):
    """A structure kind this family cannot remove exactly (the message says why and what to use)."""


def set_config_fields(config, **fields) -> bool:
    """Set several config fields at once if the result passes the config's own validation.

    transformers validates each assignment (``hidden_size % num_attention_heads == 0`` for
    Llama), which a pruned model may not meet; then the config keeps its old values (a skeleton
    :func:`llmp.load_pruned` reshapes from the weights) and this returns ``False``.
    """
    old = {k: config.__dict__.get(k) for k in fields}
    before = {k: getattr(config, k, None) for k in fields}
    config.__dict__.update(fields)
    try:
        for k, v in fields.items():
            if getattr(config, k, None) != v:  # held behind a descriptor (MoE configs' ``num_experts``)
                setattr(config, k, v)
        validate = getattr(config, "validate", None)
        if validate is not None:
            validate()
    except Exception:  # transformers' StrictDataclassClassValidationError and friends
        config.__dict__.update(old)
        for k, v in before.items():
            if getattr(config, k, None) != v:
                object.__setattr__(config, k, v)
        return False
    return True


def uniform_shape(shapes: list[dict[str, int]]) -> dict[str, int] | None:
    """The one per-layer shape when every layer has it, else ``None``."""
    return shapes[0] if shapes and all(s == shapes[0] for s in shapes) else None


def keep_layers(config, keep: list[int]) -> None:
    """Keep the config's per-layer lists in step with the kept layers (``layer_types``: which
    layers use sliding-window attention in Gemma 2/3, Qwen2, Mistral ...)."""
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = [config.layer_types[i] for i in keep]


def refuse_hidden_layernorm(family: str) -> None:
    """Raise: hidden channels of a LayerNorm model cannot be removed exactly.

    Raises:
        Unsupported: always.
    """
    raise Unsupported(
        f"hidden-channel pruning (`scope` channel) is not supported for {family}: its LayerNorm subtracts the "
        "mean over all channels, so removed channels cannot reproduce the model with those channels "
        "zeroed. Use `scope` block (attention heads, MLP channels) or `scope` layer."
    )


def rescale_rms(norm: nn.Module, old: int, new: int, one_plus: bool = False, eps: str | None = None) -> None:
    """Make an RMSNorm over ``new`` channels compute what it computed over ``old`` with the removed
    ones zero: it divides by sqrt(mean(x^2) + eps), and the mean now runs over ``new`` channels,
    so its gain is scaled by sqrt(old/new) and eps by old/new (exact). ``one_plus``: the gain is
    ``1 + w`` (Gemma), scaled as a whole. ``eps``: the attribute's name (found if not given)."""
    gain = (old / new) ** 0.5
    if one_plus:
        norm.weight.data.add_(1.0).mul_(gain).sub_(1.0)
    else:
        norm.weight.data.mul_(gain)
    eps = eps or next(a for a in ("variance_epsilon", "eps", "epsilon") if hasattr(norm, a))
    setattr(norm, eps, getattr(norm, eps) * old / new)


class Adapter(ABC):
    """All knowledge of one model family: its module names and how its structures couple.

    Subclasses list the ``model_types`` they handle, name their modules, build one attention and
    one MLP group per layer, and implement :meth:`sync` (which attributes the forward reads must
    follow the new shapes).
    """

    family: ClassVar[str]
    model_types: ClassVar[tuple[str, ...]]
    kinds: ClassVar[tuple[Kind, ...]]
    automatic: ClassVar[bool] = False
    """Found by tracing, not written for the family: the pruner checks its map first (:mod:`llmp.verify`)."""
    layers_path: ClassVar[str] = "model.layers"
    """The decoder layers' ``nn.ModuleList``."""
    layernorm: ClassVar[bool] = False
    """LayerNorm on the residual stream: hidden channels are refused (:func:`refuse_hidden_layernorm`)."""
    embed_path: ClassVar[str] = "model.embed_tokens"
    final_norm_path: ClassVar[str] = "model.norm"
    hidden_norms: ClassVar[tuple[str, ...]] = ()
    """A layer's RMSNorms over the hidden channels (those a layer lacks are skipped)."""
    hidden_readers: ClassVar[tuple[str, ...]] = ()
    """A layer's linear modules that read the residual stream (their input columns)."""
    hidden_writers: ClassVar[tuple[str, ...]] = ()
    """A layer's linear modules that write into it (their output rows and biases)."""
    bias_flags: ClassVar[dict[str, tuple[str, ...]]] = {}
    """Config flags that give a set of a layer's linear modules biases in plain transformers
    (Llama's ``attention_bias``, ``mlp_bias``): how a compensated uniform model stays loadable."""

    def layers(self, model: PreTrainedModel) -> nn.ModuleList:
        """The decoder layers, in order."""
        return model.get_submodule(self.layers_path)

    # -- discovery ---------------------------------------------------------------------------------

    def discover(self, model: PreTrainedModel, kinds: tuple[Kind, ...]) -> Structure:
        """The groups of the requested kinds, layer by layer.

        Raises:
            Unsupported: a kind this family cannot remove exactly (see :meth:`check_kinds`).
        """
        self.check_kinds(model, kinds)
        groups: list[Group] = []
        for i in range(len(self.layers(model))):
            if Kind.KV_GROUPS in kinds or Kind.QUERY_HEADS in kinds:
                groups.append(self.attention_group(model, i, kinds))
            if Kind.MLP in kinds:
                groups.append(self.mlp_group(model, i))
        if Kind.HIDDEN in kinds:
            groups.append(self.hidden_group(model))
        if Kind.LAYERS in kinds:
            groups.append(self.layer_group(model))
        return Structure(self.family, groups)

    def check_kinds(self, model: PreTrainedModel, kinds: tuple[Kind, ...]) -> None:
        """Refuse what this family cannot remove exactly (default: hidden channels under LayerNorm).

        Raises:
            Unsupported: with the reason and what to use instead.
        """
        if Kind.HIDDEN in kinds and self.layernorm:
            refuse_hidden_layernorm(self.family)

    def attention_group(self, model: PreTrainedModel, i: int, kinds: tuple[Kind, ...]) -> Group:
        """Layer ``i``'s query heads (``QUERY_HEADS`` in ``kinds``, grouped models) or KV groups."""
        raise NotImplementedError(f"the {self.family} adapter names no attention group")

    def mlp_group(self, model: PreTrainedModel, i: int) -> Group:
        """Layer ``i``'s MLP channels."""
        raise NotImplementedError(f"the {self.family} adapter names no MLP group")

    def hidden_group(self, model: PreTrainedModel) -> Group:
        """The hidden channels: embedding columns, and in every layer its norms, the columns of
        what reads the stream and the rows of what writes into it; then the final norm and the
        output head (when not tied to the embedding)."""
        embed = model.get_submodule(self.embed_path)
        slices = [Slice(f"{self.embed_path}.weight", 1, 1, writes=True)]
        for i, layer in enumerate(self.layers(model)):
            p = f"{self.layers_path}.{i}"
            slices += [Slice(f"{p}.{n}.weight", 0, 1) for n in self.hidden_norms if _has(layer, n)]
            slices += [Slice(f"{p}.{n}.weight", 1, 1) for n in self.hidden_readers]
            for name in self.hidden_writers:
                slices.append(Slice(f"{p}.{name}.weight", 0, 1, writes=True))
                if layer.get_submodule(name).bias is not None:
                    slices.append(Slice(f"{p}.{name}.bias", 0, 1, writes=True))
        slices.append(Slice(f"{self.final_norm_path}.weight", 0, 1))
        head = model.get_output_embeddings()
        if head is not None and head.weight is not embed.weight:
            slices.append(Slice(f"{module_name(model, head)}.weight", 1, 1))
        return Group("hidden", Kind.HIDDEN, None, embed.embedding_dim, tuple(slices))

    def layer_group(self, model: PreTrainedModel) -> Group:
        """Whole decoder layers."""
        n = len(self.layers(model))
        return Group("layers", Kind.LAYERS, None, n, modules=tuple(f"{self.layers_path}.{i}" for i in range(n)))

    # -- after surgery -----------------------------------------------------------------------------

    def layer_writes(self, model: PreTrainedModel, i: int) -> list[str]:
        """Names of the parameters through which layer ``i`` writes into the residual stream
        (default: the weights and biases of ``hidden_writers``)."""
        if not self.hidden_writers:
            raise NotImplementedError(f"the {self.family} adapter names no modules writing into the stream")
        layer, p = self.layers(model)[i], f"{self.layers_path}.{i}"
        names = [f"{p}.{n}.weight" for n in self.hidden_writers]
        return names + [f"{p}.{n}.bias" for n in self.hidden_writers if layer.get_submodule(n).bias is not None]

    def remove_layers(self, model: PreTrainedModel, drop: list[int]) -> None:
        """Delete decoder layers ``drop`` (and their per-layer config entries)."""
        layers = self.layers(model)
        keep = [i for i in range(len(layers)) if i not in set(drop)]
        self.layers_kept(model, keep, len(layers))
        parent, _, name = self.layers_path.rpartition(".")
        setattr(model.get_submodule(parent), name, nn.ModuleList(layers[i] for i in keep))
        keep_layers(model.config, keep)

    def layers_kept(self, model: PreTrainedModel, keep: list[int], n_before: int) -> None:  # noqa: B027
        """Called before the layer list shrinks to ``keep`` (ALiBi bookkeeping). Default: nothing."""

    @abstractmethod
    def sync(self, model: PreTrainedModel) -> None:
        """Make every attribute and config field the forward reads agree with the weights."""

    @abstractmethod
    def layer_shapes(self, model: PreTrainedModel) -> list[dict[str, int]]:
        """Per-layer counts (heads, KV heads, MLP channels) read from the weights."""

    @abstractmethod
    def apply_uniform_config(self, model: PreTrainedModel) -> bool:
        """Write the (equal) per-layer counts into the config so plain loaders rebuild them.

        Returns whether the config accepted them (see :func:`set_config_fields`).
        """

    def plain_biases(self, model: PreTrainedModel, add: bool = True) -> bool:
        """Declare the biases that compensation added (``config.llmp_biases``, see
        :mod:`llmp.pruning.compensation`) the way the family's config can: each :attr:`bias_flags` set that
        holds one of them gets a bias in every module of every layer (zeros where there was none)
        and its flag is set.

        Returns whether every added bias is now declared, so that plain transformers loads them
        (``add`` off: only whether they are, changing nothing).
        """
        added = set(getattr(model.config, BIASES_KEY, None) or ())
        declared = set()
        for flag, names in self.bias_flags.items():
            if not added & set(names) or not hasattr(model.config, flag):
                continue
            if not add:
                complete = all(layer.get_submodule(n).bias is not None for layer in self.layers(model) for n in names)
                declared |= set(names) if complete and getattr(model.config, flag) else set()
                continue
            for layer in self.layers(model):
                for m in (layer.get_submodule(n) for n in names):
                    if m.bias is None:
                        m.bias = nn.Parameter(m.weight.new_zeros(m.out_features))
            setattr(model.config, flag, True)
            declared |= set(names)
        return added <= declared

    def rescale_hidden(self, model: PreTrainedModel, old: int, new: int) -> None:
        """Compensate normalisations for the hidden channels removed (``old`` → ``new``):
        by default every RMSNorm over the stream (:func:`rescale_rms`) and ``config.rms_norm_eps``."""
        self.check_kinds(model, (Kind.HIDDEN,))
        norms = [model.get_submodule(self.final_norm_path)]
        for layer in self.layers(model):
            norms += [layer.get_submodule(n) for n in self.hidden_norms if _has(layer, n)]
        for norm in norms:
            rescale_rms(norm, old, new)
        model.config.rms_norm_eps *= old / new

    def note_removal(self, model: PreTrainedModel, group: Group, elements: list[int]) -> None:  # noqa: B027
        """Called by :func:`llmp.surgery.apply` before ``elements`` of ``group`` are sliced away.

        For state the weights alone cannot tell afterwards, such as which original heads a layer
        keeps (their ALiBi slopes, see :mod:`llmp.structure.adapters.alibi`). Default: nothing.
        """


def module_name(model: nn.Module, module: nn.Module) -> str:
    """The name of ``module`` inside ``model`` (``lm_head``; GPT-NeoX's ``embed_out``)."""
    return next(name for name, m in model.named_modules() if m is module)


def _has(layer: nn.Module, path: str) -> bool:
    try:
        layer.get_submodule(path)
    except AttributeError:
        return False
    return True
