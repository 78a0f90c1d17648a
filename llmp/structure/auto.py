"""Automatic discovery for decoder families llmp has no adapter for.

One traced forward pass (:mod:`llmp.structure.trace`) tells, for every channel of every
projection, where it goes. From it :class:`AutoAdapter` builds the same groups a family adapter
writes by hand::

    attention call          query head i reads q[i], k[i], v[i]  →  KV groups / query heads,
                            the projection reading its output    →  o_proj columns (writes)
    projection P reading    column j's coupled channels          →  MLP channel j:
      a non-residual input  (silu(g)*u: a row of g and of u)        rows of g, u; column j of P
    token embedding         channel c and everything added to it →  hidden channel c: norms,
                                                                    every reader and writer

Whatever it cannot map with certainty (an op it does not know on a projection's output, a
projection read by two consumers, a norm pooling across heads, a LayerNorm on the residual) is
refused by module name; :func:`llmp.verify.verify` then checks what it accepted: a random removal
applied to one copy must compute what masking it computes on another, or llmp refuses to prune.

Example::

    adapter = AutoAdapter()
    structure = adapter.discover(model, (Kind.QUERY_HEADS, Kind.MLP))
    llmp.verify.verify(model, structure, adapter)  # LlmpError if the pruned model would differ
"""

from __future__ import annotations

from torch import nn
from transformers import PreTrainedModel

from llmp.errors import LlmpError
from llmp.structure.adapters.base import Adapter, keep_layers, rescale_rms, set_config_fields, uniform_shape
from llmp.structure.groups import Kind, Structure
from llmp.structure.mapping import ALL_KINDS, Analysis, Mapping

DOCS = "docs/adapters.md"
INFO_KEY = "llmp_auto"  # what sync() needs, kept in the config so a saved model carries it


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList] | None:
    """The longest ``ModuleList`` of blocks of one class: the decoder layers."""
    best = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) and len({type(m) for m in module}) == 1:
            if best is None or len(module) > len(best[1]):
                best = (name, module)
    return best


class AutoAdapter(Adapter):
    """Discovers the groups of a decoder llmp has no family adapter for (see the module doc)."""

    family = "auto"
    model_types = ()
    kinds = ALL_KINDS
    automatic = True

    def __init__(self, known: tuple[str, ...] = ()):
        self._cache: dict[tuple, Analysis] = {}
        self._known = known  # the model types with a family adapter, for the refusal's message

    # -- discovery -------------------------------------------------------------------------------
    def layers(self, model: PreTrainedModel) -> nn.ModuleList:
        found = decoder_layers(model)
        if found is None:
            raise LlmpError(self._refusal(model, ["no list of decoder layers (an nn.ModuleList of blocks) found"]))
        return found[1]

    def discover(self, model: PreTrainedModel, kinds: tuple[Kind, ...]) -> Structure:
        """The groups of ``kinds``, or an :class:`LlmpError` naming every module it could not map.

        Raises:
            LlmpError: a requested kind is not mappable with certainty in some layer.
        """
        analysis = self.analyze(model)
        wanted = list(kinds)
        if Kind.QUERY_HEADS in wanted and Kind.KV_GROUPS in wanted:
            wanted.remove(Kind.KV_GROUPS)
        problems = [p for k in wanted for p in analysis.problems.get(k, [])]
        if problems:
            raise LlmpError(self._refusal(model, problems, wanted))
        groups = [g for k in wanted for g in analysis.groups.get(k, [])]
        order = {Kind.KV_GROUPS: 0, Kind.QUERY_HEADS: 0, Kind.MLP: 1, Kind.HIDDEN: 2, Kind.LAYERS: 3}
        groups.sort(key=lambda g: (g.layer is None, g.layer or 0, order[g.kind]))
        return Structure(self.family, groups)

    def analyze(self, model: PreTrainedModel) -> Analysis:
        """Trace ``model`` once (cached per model and shapes) and map every kind it can."""
        key = (id(model), tuple((n, tuple(p.shape)) for n, p in model.named_parameters()))
        if key not in self._cache:
            self._cache.clear()
            self._cache[key] = Mapping(model, self.layers(model), decoder_layers(model)[0]).run()
            setattr(model.config, INFO_KEY, self._cache[key].info)
        return self._cache[key]

    def _refusal(self, model: PreTrainedModel, problems: list[str], kinds=None) -> str:
        model_type = getattr(model.config, "model_type", None)
        what = f" for {', '.join(k.value for k in kinds)}" if kinds else ""
        return (
            f"unsupported architecture `{model_type}` ({type(model).__name__}): automatic discovery cannot "
            f"map it with certainty{what}: {'; '.join(problems[:8])}"
            f"{f' (and {len(problems) - 8} more)' if len(problems) > 8 else ''}. llmp refuses to prune it rather "
            f"than risk a wrong model; supported model types: {', '.join(self._known) or 'see llmp.structure.adapters'}. "
            f"To add this family, write an adapter in one file (see {DOCS})."
        )

    # -- after surgery ---------------------------------------------------------------------------
    def _info(self, model: PreTrainedModel) -> dict:
        info = getattr(model.config, INFO_KEY, None)
        if not info:
            info = self.analyze(model).info
        return info

    def layer_writes(self, model: PreTrainedModel, i: int) -> list[str]:
        info = self._info(model)
        return [f"{info['layers']}.{i}.{p}" for p in info["per_layer"][i]["writes"]]

    def remove_layers(self, model: PreTrainedModel, drop: list[int]) -> None:
        info, layers = self._info(model), self.layers(model)
        keep = [i for i in range(len(layers)) if i not in set(drop)]
        model.get_submodule(info["layers"].rpartition(".")[0] or "").__setattr__(
            info["layers"].rpartition(".")[2], nn.ModuleList(layers[i] for i in keep)
        )
        info["per_layer"] = [info["per_layer"][i] for i in keep]
        keep_layers(model.config, keep)

    def sync(self, model: PreTrainedModel) -> None:
        info, layers = self._info(model), self.layers(model)
        shapes = self.layer_shapes(model)
        for i, (layer, entry, shape) in enumerate(zip(layers, info["per_layer"], shapes, strict=True)):
            for module in layer.modules():
                if isinstance(getattr(module, "layer_idx", None), int):
                    module.layer_idx = i
            if "attn" in entry:
                heads, kv = shape["heads"], shape["kv_heads"]
                values = {
                    "heads": heads,
                    "kv_heads": kv,
                    "groups": heads // kv,
                    "heads_x_dim": heads * entry["head_dim"],
                    "kv_x_dim": kv * entry["head_dim"],
                }
                for path, rule in entry["attrs"].items():
                    module_path, _, attr = path.rpartition(".")
                    setattr(layer.get_submodule(module_path), attr, values[rule])
        fields = {name: len(layers) for name in info["config"].get("layers", [])}
        embed = model.get_input_embeddings()
        fields.update({name: embed.embedding_dim for name in info["config"].get("hidden", [])})
        set_config_fields(model.config, **fields)
        self._uniform_config(model, shapes)

    def layer_shapes(self, model: PreTrainedModel) -> list[dict[str, int]]:
        info, layers = self._info(model), self.layers(model)
        shapes = []
        for layer, entry in zip(layers, info["per_layer"], strict=True):
            shape = {}
            if "attn" in entry:
                d = entry["head_dim"]
                heads = (layer.get_parameter(entry["o"]).shape[1] - entry["o_base"]) // d
                base, with_q, mult = entry["k_rows"]
                rows = layer.get_parameter(entry["k"]).shape[0] - base - with_q * heads * d
                shape.update(heads=heads, kv_heads=rows // (mult * d))
            if "mlp" in entry:
                shape["mlp"] = layer.get_parameter(entry["mlp"]).shape[1] - entry["mlp_base"]
            shapes.append(shape)
        return shapes

    def apply_uniform_config(self, model: PreTrainedModel) -> bool:
        return self._uniform_config(model, self.layer_shapes(model))

    def _uniform_config(self, model: PreTrainedModel, shapes: list[dict[str, int]]) -> bool:
        shape = uniform_shape(shapes)
        if shape is None:
            return False
        rules = self._info(model)["config"]
        fields = {name: shape[key] for key in ("heads", "kv_heads", "mlp") for name in rules.get(key, [])}
        fields.update({name: model.get_input_embeddings().embedding_dim for name in rules.get("hidden", [])})
        return set_config_fields(model.config, **fields) if fields else True

    def rescale_hidden(self, model: PreTrainedModel, old: int, new: int) -> None:
        # Every RMSNorm the trace found over the stream (see rescale_rms), and the config's eps.
        info = self._info(model)
        norms = list(info["norms"])
        for i in range(len(self.layers(model))):
            norms += [(f"{info['layers']}.{i}.{path}", form, eps) for path, form, eps in info["layer_norms"]]
        for path, form, eps in norms:
            rescale_rms(model.get_submodule(path), old, new, one_plus=form == "1+w", eps=eps)
        for name in info["config"].get("eps", []):
            setattr(model.config, name, getattr(model.config, name) * old / new)


# ------------------------------------------------------------------------------------------------
