"""The trace → groups mapping behind automatic discovery (see :mod:`llmp.structure.auto`).

:class:`Mapping` walks one traced forward pass (:mod:`llmp.structure.trace`) and writes, for every
kind, the groups it could map with certainty and, by module name, what it refused.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import PreTrainedModel

from llmp.structure.groups import Group, Kind, Slice
from llmp.structure.layouts import config_rules, dedupe, make_slices, rms_form
from llmp.structure.mapping_attention import AttentionMapping
from llmp.structure.trace import trace_model

ALL_KINDS = (Kind.KV_GROUPS, Kind.QUERY_HEADS, Kind.MLP, Kind.HIDDEN, Kind.LAYERS)


@dataclass
class Analysis:
    """Everything discovery learnt about one model: groups by kind, and what it refused."""

    groups: dict[Kind, list[Group]] = field(default_factory=lambda: defaultdict(list))
    problems: dict[Kind, list[str]] = field(default_factory=lambda: defaultdict(list))
    info: dict = field(default_factory=dict)


class Mapping(AttentionMapping):
    """Turns one :class:`Trace` into groups (one object per analysis; see the module doc)."""

    def __init__(self, model: PreTrainedModel, layers: nn.ModuleList, layers_path: str):
        self.model, self.layers, self.path = model, layers, layers_path
        self.out = Analysis()
        self.params = dict(model.named_parameters())

    def run(self) -> Analysis:
        try:
            self.trace = trace_model(self.model)
        except Exception as err:  # the model's own forward failed under the tracer
            for kind in ALL_KINDS:
                self.out.problems[kind].append(f"tracing one forward pass failed ({type(err).__name__}: {err})")
            return self.out
        t = self.trace
        self.members: dict[int, list[tuple[int, int]]] = defaultdict(list)
        self.roots: dict[int, torch.Tensor] = {}
        for s, source in enumerate(t.sources):
            if source.kind in ("linear", "embed"):
                roots = torch.tensor(t.components(s))
                self.roots[s] = roots
                for c, r in enumerate(roots.tolist()):
                    self.members[r].append((s, c))
        self.consumers: dict[int, set] = defaultdict(set)
        for k, sink in enumerate(t.sinks):
            for r in self._find(sink.codes):
                self.consumers[r].add(("sink", k))
        for e, att in enumerate(t.attentions):
            for codes in (att.q, att.k, att.v):
                for r in self._find(codes):
                    self.consumers[r].add(("attention", e))
        self.tainted = {s: op for op in t.opaque for s in op.sources}
        self.stat_roots = [(st, [self._find(row) for row in st.codes]) for st in t.stats]
        self.use_roots = [(u, self._find(u.pairs[:, 1])) for u in t.uses]
        n = len(self.layers)
        self.out.info = {
            "layers": self.path,
            "per_layer": [{"writes": []} for _ in range(n)],
            "norms": [],
            "layer_norms": [],
            "config": {},
        }
        self.out.info["config"] = config_rules(self.model.config, n)
        self._hidden()
        o_sinks = set()
        self.claimed = set(self.hidden_sources)
        for e, att in enumerate(t.attentions):
            o_sinks |= self._attention(e, att)
        for i in range(n):
            self._mlp(i, o_sinks)
        self._unclaimed()
        if not t.attentions:
            for kind in (Kind.KV_GROUPS, Kind.QUERY_HEADS):
                self.out.problems[kind].append("no attention call (scaled_dot_product_attention) reads projections")
        self._layers_group()
        return self.out

    # -- helpers ---------------------------------------------------------------------------------
    def _find(self, codes: torch.Tensor) -> list[int]:
        return [self.trace.find(c) if c >= 0 else -1 for c in codes.reshape(-1).tolist()]

    def _layer_of(self, module: str) -> int | None:
        m = re.match(rf"{re.escape(self.path)}\.(\d+)(\.|$)", module)
        return int(m.group(1)) if m else None

    def _rel(self, name: str, i: int) -> str:
        return name[len(f"{self.path}.{i}.") :]

    def _module(self, s: int) -> str:
        return self.trace.sources[s].module

    def _check_elements(self, kind: Kind, elements: list[set[int]], owner: set, where: str) -> list[str]:
        """Problems with element root sets: overlaps, other consumers, opaque ops, pooling across them."""
        problems, element_of = [], {}
        for e, roots in enumerate(elements):
            for r in roots:
                if r in element_of and element_of[r] != e:
                    problems.append(f"{where}: elements {element_of[r]} and {e} share channels")
                element_of[r] = e
        for r in element_of:
            extra = self.consumers.get(r, set()) - owner
            if extra:
                tag = sorted(extra)[0]
                reader = self.trace.sinks[tag[1]].module if tag[0] == "sink" else self.trace.attentions[tag[1]].module
                members = self.members.get(r, [])
                src = self._module(members[0][0]) if members else where
                problems.append(f"`{src}` output is read by two consumers ({where} and `{reader}`)")
                break
        for r in element_of:
            for s, _ in self.members.get(r, []):
                if s in self.tainted:
                    op = self.tainted[s]
                    problems.append(f"`{self._module(s)}` output goes through `{op.op}` in `{op.module}`")
                    break
        for stat, rows in self.stat_roots:
            for row in rows:
                hit = {element_of[r] for r in row if r in element_of}
                if len(hit) > 1 or (hit and any(r not in element_of and r >= 0 for r in row)):
                    problems.append(f"`{stat.module}` pools channels of several {kind.value} ({stat.op})")
                    break
        return sorted(set(problems))

    def _member_slices(self, elements: list[set[int]], writes: bool, where: str) -> tuple[list[Slice], list[str]]:
        """Rows (dim 0) of every projection channel in each element, plus per-element parameters."""
        per_param: dict[str, list[list[int]]] = {}
        for e, roots in enumerate(elements):
            for r in roots:
                for s, c in self.members.get(r, []):
                    src = self.trace.sources[s]
                    for name in (src.param, src.bias):
                        if name is not None:
                            dim = 1 if src.kind == "embed" else 0
                            per_param.setdefault((name, dim), [[] for _ in elements])[e].append(c)
        slices, problems = [], []
        for (name, dim), rows in per_param.items():
            made = make_slices(name, dim, rows, writes)
            if made is None:
                problems.append(f"{where}: the channels of `{name}` have no regular per-element layout")
            slices += made or []
        s2, p2 = self._param_slices(elements, where)
        return slices + s2, problems + p2

    def _param_slices(self, elements: list[set[int]], where: str) -> tuple[list[Slice], list[str]]:
        """Parameters used elementwise on the elements (norm gains): sliced if per element, else shared."""
        element_of = {r: e for e, roots in enumerate(elements) for r in roots}
        slices, problems, seen = [], [], set()
        for use, roots in self.use_roots:
            owner = defaultdict(set)
            for (idx, _), r in zip(use.pairs.tolist(), roots, strict=True):
                if r in element_of:
                    owner[idx].add(element_of[r])
            if not owner or use.param in seen:
                continue
            seen.add(use.param)
            if all(len(v) == len(elements) for v in owner.values()) and len(elements) > 1:
                continue  # shared by every element (a per-head-dim norm gain): not sliced
            if any(len(v) > 1 for v in owner.values()) or self.params[use.param].dim() != 1:
                problems.append(f"{where}: `{use.param}` is shared by some elements and not others")
                continue
            rows = [[] for _ in elements]
            for idx, es in owner.items():
                rows[next(iter(es))].append(idx)
            made = make_slices(use.param, 0, rows, False)
            if made is None:
                problems.append(f"{where}: `{use.param}` has no regular per-element layout")
            slices += made or []
        return slices, problems

    # -- kinds -----------------------------------------------------------------------------------
    def _hidden(self) -> None:
        t, kind, problems = self.trace, Kind.HIDDEN, self.out.problems[Kind.HIDDEN]
        token = dict(self.model.named_parameters()).keys() & {
            n for n, p in self.model.named_parameters() if p is self.model.get_input_embeddings().weight
        }
        embeds = [s for s, src in enumerate(t.sources) if src.kind == "embed" and src.param in token]
        if len(embeds) != 1:  # position embeddings join the hidden channels through the sum
            problems.append(f"expected one token embedding, found {len(embeds)}")
            self.hidden_roots, self.hidden_sources = set(), set()
            return
        roots = self.roots[embeds[0]].tolist()
        self.hidden_roots = set(roots)
        self.hidden_sources = {s for r in self.hidden_roots for s, _ in self.members[r]}
        where = "hidden channels"
        if len(self.hidden_roots) != len(roots):
            problems.append(f"`{self._module(embeds[0])}` channels are mixed with each other")
            return
        elements = [{r} for r in roots]
        for s, src in enumerate(t.sources):  # which layer writes through which parameters
            if src.kind == "linear" and s in self.roots and self.hidden_roots & set(self.roots[s].tolist()):
                i = self._layer_of(src.module)
                if i is not None:
                    self.out.info["per_layer"][i]["writes"] += [self._rel(p, i) for p in (src.param, src.bias) if p]
        slices, more = self._member_slices(elements, True, where)
        problems += more
        element_of = {r: e for e, r in enumerate(roots)}
        for sink in t.sinks:
            sroots = self._find(sink.codes)
            hit = [r in element_of for r in sroots]
            if any(hit) and not all(hit):
                problems.append(f"`{sink.module}` reads hidden channels together with other channels")
            elif all(hit):
                cols = [[] for _ in roots]
                for j, r in enumerate(sroots):
                    cols[element_of[r]].append(j)
                made = make_slices(sink.param, 1, cols, False)
                if made is None:
                    problems.append(f"`{sink.module}` reads hidden channels in an irregular order")
                slices += made or []
        for att in t.attentions:
            if any(r in element_of for codes in (att.q, att.k, att.v) for r in self._find(codes)):
                problems.append(f"`{att.module}` attends over hidden channels directly")
        for s in (s for r in roots for s, _ in self.members[r]):
            if s in self.tainted:
                op = self.tainted[s]
                problems.append(f"`{self._module(s)}` output goes through `{op.op}` in `{op.module}`")
                break
        problems += self._hidden_norms(element_of, len(roots))
        size = len(roots)
        if not problems:
            self.out.groups[kind].append(Group("hidden", kind, None, size, tuple(dedupe(slices))))

    def _hidden_norms(self, element_of: dict[int, int], size: int) -> list[str]:
        """The norms over the residual stream: each an RMSNorm whose weight loses the removed
        channels (recorded in the info with its form), else a problem; and the config's eps keys."""
        problems, norms = [], set()
        for stat, rows in self.stat_roots:
            if any(r in element_of for row in rows for r in row):
                norms.add(stat.module)
                if any(r >= 0 and r not in element_of for row in rows for r in row):
                    problems.append(f"`{stat.module}` pools hidden channels with other channels ({stat.op})")
        for name in sorted(norms):
            form = rms_form(self.model.get_submodule(name), size)
            if form is None:
                problems.append(
                    f"`{name}` ({type(self.model.get_submodule(name)).__name__}) normalises the residual stream "
                    "and is not an RMSNorm: removing hidden channels would change what it computes"
                )
                continue
            i = self._layer_of(name)
            if i is None:
                self.out.info["norms"].append((name, *form))
            elif i == 0:
                self.out.info["layer_norms"].append((self._rel(name, 0), *form))
        eps = {getattr(self.model.get_submodule(n), e) for n, _, e in self.out.info["norms"]}
        eps |= {getattr(self.layers[0].get_submodule(n), e) for n, _, e in self.out.info["layer_norms"]}
        self.out.info["config"]["eps"] = [
            k
            for k, v in self.model.config.to_dict().items()
            if "eps" in k.lower() and isinstance(v, float) and v in eps
        ]
        return problems

    def _mlp(self, i: int, o_sinks: set[int]) -> None:
        kind, t = Kind.MLP, self.trace
        candidates = []
        for k, sink in enumerate(t.sinks):
            if k in o_sinks or self._layer_of(sink.module) != i:
                continue
            roots = self._find(sink.codes)
            if any(r in self.hidden_roots for r in roots):
                continue
            candidates.append((k, sink, roots))
        if not candidates:
            return
        if len(candidates) > 1:
            names = ", ".join(f"`{c[1].module}`" for c in candidates)
            self.out.problems[kind].append(f"layer {i}: several projections read inner channels ({names})")
            return
        k, sink, roots = candidates[0]
        where = f"`{sink.module}`"
        self.claimed |= {s for r in roots for s, _ in self.members.get(r, [])}
        problems = []
        if -1 in roots:
            problems.append(f"{where} reads channels of no projection")
        elements = [{r} for r in roots]
        problems += self._check_elements(kind, elements, {("sink", k)}, where)
        for r in roots:
            for s, _ in self.members.get(r, []):
                if self._layer_of(self._module(s)) != i:
                    problems.append(f"{where} reads `{self._module(s)}` of another layer")
                    break
        slices, more = self._member_slices(elements, False, where)
        problems += more
        if problems:
            self.out.problems[kind] += sorted(set(problems))
            return
        slices += make_slices(sink.param, 1, [[j] for j in range(len(roots))], True)
        self.out.groups[kind].append(Group(f"layers.{i}.mlp", kind, i, len(roots), tuple(dedupe(slices))))
        entry = self.out.info["per_layer"][i]
        entry.update(mlp=self._rel(sink.param, i), mlp_base=self.params[sink.param].shape[1] - len(roots))
        if i == 0:
            self.out.info["config"]["mlp"] = [
                name
                for name, value in self.model.config.to_dict().items()
                if value == len(roots) and any(w in name.lower() for w in ("intermediate", "ffn", "inner", "mlp"))
            ]

    def _unclaimed(self) -> None:
        """Projections in a layer whose output reaches nothing mapped (an unknown op, say): no MLP."""
        for s, src in enumerate(self.trace.sources):
            if src.kind != "linear" or s in self.claimed or self._layer_of(src.module) is None:
                continue
            if s in self.tainted:
                op = self.tainted[s]
                problem = f"`{src.module}` output goes through `{op.op}` in `{op.module}`"
            else:
                problem = f"`{src.module}` output reaches no projection or attention that llmp can map"
            self.out.problems[Kind.MLP].append(problem)

    def _layers_group(self) -> None:
        n = len(self.layers)
        missing = [i for i, e in enumerate(self.out.info["per_layer"]) if not e["writes"]]
        opaque = [op for op in self.trace.opaque if op.sources & self.hidden_sources]
        if opaque:  # a layer may write through it: zeroing the writes found would not remove the layer
            self.out.problems[Kind.LAYERS].append(
                f"the residual stream goes through `{opaque[0].op}` in `{opaque[0].module}`"
            )
        elif missing:
            self.out.problems[Kind.LAYERS].append(f"layers {missing} write nothing found into the residual stream")
            return
        modules = tuple(f"{self.path}.{i}" for i in range(n))
        self.out.groups[Kind.LAYERS].append(Group("layers", Kind.LAYERS, None, n, modules=modules))
