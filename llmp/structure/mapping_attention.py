"""How one attention call of a traced forward maps to head groups (part of :class:`~llmp.structure.mapping.Mapping`).

::

    q, k, v channels per head ─► KV groups (its query heads + its K/V head) and query heads
    the one projection reading the output ─► its columns per head (o_proj's slices)
    sync()'s rules: how head counts follow from the weights, and which attributes to set

A mixin: the state (trace, members, claimed, out) is the :class:`Mapping`'s.
"""

from __future__ import annotations

from llmp.structure.groups import Group, Kind
from llmp.structure.layouts import attr_rule, dedupe, make_slices
from llmp.structure.provenance import SHIFT


class AttentionMapping:
    """The attention half of :class:`~llmp.structure.mapping.Mapping`."""

    def _attention(self, e: int, att) -> set[int]:
        kinds = (Kind.KV_GROUPS, Kind.QUERY_HEADS)
        i = self._layer_of(att.module)
        where = f"`{att.module}`"
        problems: list[str] = []
        if i is None:
            for kind in kinds:
                self.out.problems[kind].append(f"{where} attends outside the decoder layers")
            return set()
        n, d = att.q.shape
        q_sets = [set(self._find(att.q[h])) for h in range(n)]
        k_sets = [frozenset(self._find(att.k[h])) for h in range(n)]
        v_sets = [frozenset(self._find(att.v[h])) for h in range(n)]
        kv_ids: dict[tuple, int] = {}
        group_of = [kv_ids.setdefault((k_sets[h], v_sets[h]), len(kv_ids)) for h in range(n)]
        n_kv = len(kv_ids)
        if len({k for k, _ in kv_ids}) != n_kv or len({v for _, v in kv_ids}) != n_kv:
            problems.append(f"{where}: keys and values are not paired head by head")
        per_group = n // n_kv if n % n_kv == 0 else 0
        if not per_group or any(group_of.count(g) != per_group for g in range(n_kv)):
            problems.append(f"{where}: KV heads serve unequal numbers of query heads")
        if any(-1 in s for s in q_sets + [set(k) for k in k_sets] + [set(v) for v in v_sets]):
            problems.append(f"{where}: queries, keys or values carry channels of no projection")
        readers, o_cols, more = self._output_columns(att, n, where)
        problems += more
        owner = {("attention", e)}
        for r in set().union(*q_sets, *k_sets, *v_sets):
            self.claimed |= {s for s, _ in self.members.get(r, [])}
        kv_sets = [set(k_sets[group_of.index(g)]) | set(v_sets[group_of.index(g)]) for g in range(n_kv)]
        problems += self._check_elements(Kind.QUERY_HEADS, q_sets + kv_sets, owner, where)
        order = sorted(range(n), key=lambda h: (group_of[h], h))  # query heads grouped by KV head
        entry = self.out.info["per_layer"][i]
        if problems or len(readers) != 1:
            for kind in kinds:
                self.out.problems[kind] += problems
            return set(readers)
        o_param = self.trace.sinks[readers[0]].param
        # KV groups: each element = its query heads + its K/V head, and their o_proj columns
        kv_elements = [
            kv_sets[g] | set().union(*(q_sets[h] for h in range(n) if group_of[h] == g)) for g in range(n_kv)
        ]
        kv_slices, p1 = self._member_slices(kv_elements, False, where)
        o_kv = [sorted(j for h in range(n) if group_of[h] == g for j in o_cols[h]) for g in range(n_kv)]
        o_made = make_slices(o_param, 1, o_kv, True)
        q_slices, p2 = self._member_slices([q_sets[h] for h in order], False, where)
        o_q = make_slices(o_param, 1, [o_cols[h] for h in order], True)
        if o_made is None or o_q is None:
            p1.append(f"`{o_param}`: the attention output columns have no regular per-head layout")
        if p1 or p2:
            for kind in kinds:
                self.out.problems[kind] += p1 + p2
            return set(readers)
        self._attention_groups(i, n, n_kv, per_group, kv_slices + o_made, q_slices + o_q)
        self._attention_info(i, att, entry, kv_slices, o_param, o_cols, n, n_kv, d)
        return set(readers)

    def _output_columns(self, att, n: int, where: str) -> tuple[list[int], list[list[int]], list[str]]:
        """o_proj: the one projection reading this attention's output and nothing else, and the
        columns of it that each head's output feeds."""
        base, problems = att.out << SHIFT, []
        readers = [k for k, sink in enumerate(self.trace.sinks) if ((sink.codes >> SHIFT) == att.out).any()]
        o_cols: list[list[int]] = [[] for _ in range(n)]
        if len(readers) != 1:
            problems.append(f"{where}: its output is read by {len(readers)} projections (expected one)")
            return readers, o_cols, problems
        sink = self.trace.sinks[readers[0]]
        if not ((sink.codes >> SHIFT) == att.out).all():
            problems.append(f"`{sink.module}` reads the attention output together with other channels")
            return readers, o_cols, problems
        dv = self.trace.sources[att.out].size // n
        for j, code in enumerate(sink.codes.tolist()):
            o_cols[(code - base) // dv].append(j)
        return readers, o_cols, problems

    def _attention_info(self, i, att, entry, kv_slices, o_param, o_cols, n, n_kv, d) -> None:
        """What sync() needs to re-derive head counts from weights and set the module attributes."""
        o_rows = self.params[o_param].shape[1]
        k_src = int(att.k.reshape(-1)[0]) >> SHIFT
        k_param = self.trace.sources[k_src].param
        k_total = self.params[k_param].shape[0]
        width = {sl.param: 0 for sl in kv_slices}
        for sl in kv_slices:
            if sl.dim == 0:
                width[sl.param] += sl.width
        q_src = int(att.q.reshape(-1)[0]) >> SHIFT
        with_q = int(self.trace.sources[q_src].param == k_param)
        per_kv = width[k_param] - with_q * (n // n_kv) * d  # rows per KV group beside its queries
        entry.update(
            attn=self._rel(att.module, i) if att.module != f"{self.path}.{i}" else "",
            head_dim=d,
            o=self._rel(o_param, i),
            o_base=o_rows - sum(len(c) for c in o_cols),
            k=self._rel(k_param, i),
            k_rows=[k_total - width[k_param] * n_kv, with_q, per_kv // d],
            attrs={},
        )
        module = self.model.get_submodule(att.module)
        layer = self.layers[i]
        path = att.module
        while True:  # the attention module and its parents up to the layer
            for name, value in vars(module).items():
                rule = attr_rule(name, value, n, n_kv, d)
                if rule:
                    rel = self._rel(path, i) if path != f"{self.path}.{i}" else ""
                    entry["attrs"][f"{rel}.{name}" if rel else f".{name}"] = rule
            if module is layer or "." not in path:
                break
            path = path.rpartition(".")[0]
            module = self.model.get_submodule(path)
        rules = self.out.info["config"]
        for name, value in self.model.config.to_dict().items():
            rule = attr_rule(name, value, n, n_kv, d)
            if rule in ("heads", "kv_heads") and i == 0:
                rules.setdefault(rule, []).append(name)

    def _attention_groups(self, i: int, n: int, n_kv: int, per_group: int, kv_slices: list, q_slices: list) -> None:
        kv_group = Group(f"layers.{i}.kv_groups", Kind.KV_GROUPS, i, n_kv, tuple(dedupe(kv_slices)))
        self.out.groups[Kind.KV_GROUPS].append(kv_group)
        if per_group > 1:
            q_group = Group(f"layers.{i}.query_heads", Kind.QUERY_HEADS, i, n, tuple(dedupe(q_slices)), blocks=n_kv)
        else:
            q_group = kv_group  # MHA / MQA with one query head per KV head: heads are KV groups
        self.out.groups[Kind.QUERY_HEADS].append(q_group)
