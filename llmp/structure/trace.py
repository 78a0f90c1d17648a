"""Index provenance: one forward pass in which every activation carries the channels it came from.

Each projection output (``F.linear``), the token embedding and every attention output is a
*source*: channel ``c`` of source ``s`` gets the code ``s << 32 | c``. Beside every tracked tensor
runs an int64 *label* tensor of the same shape, holding the code of each element::

    qkv = qkv_proj(x)            labels  [s|0 .. s|3hd)          (one source, 3·h·d channels)
    q, k, v = qkv.split(...)     the same split of the labels    (data movement: exact maps)
    q = q.view(b, t, h, d)       the same view ...
    y = sdpa(q, k, v)            new source a: head i reads labels q[.., i, .., :], k[..], v[..]
    o_proj(y.reshape(b, t, hd))  a sink: column j of o_proj reads code a|j

Data movement (view, transpose, split, cat, indexing, gather ...) is replayed on the labels, so
index maps through any of them come out exact. Elementwise ops on two tracked tensors (rotary,
``silu(g) * u``, residual adds) *couple* the codes they combine (a union-find); reductions and
normalisations record which codes they pool (:class:`Stat`); parameters used elementwise (norm
weights) record which of their indices meet which codes (:class:`ParamUse`). Any other op that
touches a tracked tensor is :class:`Opaque`: discovery refuses the modules it involves.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from llmp.structure.provenance import SHIFT, Attention, Opaque, ParamUse, Sink, Source, Stat, Trace, source_of

MOVEMENT = {
    "view", "reshape", "transpose", "permute", "contiguous", "split", "chunk", "unbind", "narrow", "expand",
    "expand_as", "repeat", "repeat_interleave", "unsqueeze", "squeeze", "flatten", "unflatten", "movedim",
    "moveaxis", "t", "swapaxes", "swapdims", "clone", "select", "index_select", "gather", "take_along_dim",
    "roll", "flip", "split_with_sizes", "tensor_split", "view_as", "reshape_as", "detach", "__getitem__", "__get__",
}  # fmt: skip
JOIN = {"cat", "concat", "concatenate", "stack", "hstack", "vstack"}
CAST = {"to", "float", "half", "bfloat16", "double", "type", "type_as", "cpu", "cuda", "requires_grad_"}
ELEMENTWISE = {
    "add", "sub", "mul", "div", "true_divide", "__add__", "__radd__", "__iadd__", "__sub__", "__rsub__", "__isub__",
    "__mul__", "__rmul__", "__imul__", "__truediv__", "__rtruediv__", "__itruediv__", "__neg__", "neg", "add_",
    "mul_", "sub_", "div_", "pow", "__pow__", "abs", "exp", "sigmoid", "tanh", "silu", "gelu", "relu", "relu_",
    "sin", "cos", "sqrt", "rsqrt", "square", "clamp", "clip", "softplus", "erf", "reciprocal", "log", "log1p",
    "dropout", "maximum", "minimum", "where", "masked_fill", "nan_to_num", "sign", "mish", "leaky_relu", "elu",
    "hardswish", "hardsigmoid", "logsigmoid", "glu_", "lerp", "addcmul", "tanh_", "sigmoid_", "exp_", "neg_",
}  # fmt: skip
REDUCE = {"mean", "sum", "var", "std", "norm", "amax", "amin", "max", "min", "logsumexp", "prod", "var_mean"}
NORMALIZE = {"softmax", "log_softmax", "layer_norm", "rms_norm", "group_norm", "normalize", "cumsum"}
META = {"size", "dim", "numel", "__len__", "is_floating_point", "is_contiguous", "data_ptr", "element_size", "stride"}


class Tracer(TorchFunctionMode):
    """Records a :class:`Trace` of the forward passes run under it (use as a context manager)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.trace = Trace()
        self.names = {id(p): n for n, p in model.named_parameters()}
        self.labels: dict[int, tuple[str, torch.Tensor]] = {}  # id(tensor) → ("act" | "param", codes)
        self.alive: list[torch.Tensor] = []  # ids stay unique while the tensors live
        self.stack: list[str] = [""]
        self.model = model
        self.hooks = []

    def __enter__(self):
        for name, module in self.model.named_modules():
            self.hooks.append(module.register_forward_pre_hook(lambda m, a, n=name: self._push(n)))
            self.hooks.append(module.register_forward_hook(lambda m, a, o: self._pop()))
        return super().__enter__()

    def __exit__(self, *exc):
        for hook in self.hooks:
            hook.remove()
        return super().__exit__(*exc)

    def _pop(self) -> None:
        self.stack.pop()  # returns None: a forward hook's return value would replace the output

    def _push(self, name: str) -> None:
        self.stack.append(name)
        self.trace.modules_run.append(name)

    # -- labels --------------------------------------------------------------------------------
    def _label(self, t) -> tuple[str, torch.Tensor] | None:
        if not isinstance(t, torch.Tensor):
            return None
        if id(t) in self.labels:
            return self.labels[id(t)]
        if isinstance(t, nn.Parameter) and id(t) in self.names and t.numel() <= 1 << 20:
            pid = self._new_source("param", self.names[id(t)], t.numel())
            return self._set(t, "param", (pid << SHIFT) + torch.arange(t.numel()).view(t.shape))
        return None

    def _set(self, t: torch.Tensor, kind: str, codes: torch.Tensor) -> tuple[str, torch.Tensor]:
        self.labels[id(t)] = (kind, codes)
        self.alive.append(t)
        return kind, codes

    def _new_source(self, kind: str, param: str | None, size: int, bias: str | None = None) -> int:
        self.trace.sources.append(Source(kind, param, size, self.stack[-1], bias))
        return len(self.trace.sources) - 1

    def _opaque(self, op: str, tracked: list[torch.Tensor]) -> None:
        sources = set()
        for codes in tracked:
            sources |= set(source_of(codes).unique().tolist()) - {-1}
        self.trace.opaque.append(Opaque(op, self.stack[-1], sources))

    # -- dispatch ------------------------------------------------------------------------------
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = getattr(func, "__name__", str(func))
        if name in META:
            return out
        flat, _ = tree_flatten((args, kwargs))
        if name in ("linear", "embedding", "scaled_dot_product_attention"):
            acts = [(t, self.labels[id(t)][1]) for t in flat if isinstance(t, torch.Tensor) and id(t) in self.labels]
            {"linear": self._linear, "embedding": self._embedding, "scaled_dot_product_attention": self._attention}[
                name
            ](args, kwargs, out, acts)
            return out
        tracked = [(t, self._label(t)) for t in flat if isinstance(t, torch.Tensor)]
        acts = [(t, lab[1]) for t, lab in tracked if lab is not None and lab[0] == "act"]
        params = [(t, lab[1]) for t, lab in tracked if lab is not None and lab[0] == "param"]
        if not acts and not params:  # nothing traced flows through this op
            return out
        if name in MOVEMENT or name in JOIN or name in CAST:
            self._move(func, name, args, kwargs, out, "act" if acts else "param")
        elif name in ELEMENTWISE or (name.endswith("_") and name[:-1] in ELEMENTWISE):
            self._elementwise(name, args, out, acts, params)
        elif name == "__setitem__":
            self._setitem(args)
        elif name == "copy_":
            src = self._label(args[1])
            codes = src[1].expand(args[0].shape).clone() if src else torch.full(args[0].shape, -1, dtype=torch.long)
            self._set(args[0], src[0] if src else "act", codes)
        elif acts and (name in REDUCE or name in NORMALIZE):
            self._reduce(name, args, kwargs, out, acts, params)
        elif acts or any(isinstance(o, torch.Tensor) for o in tree_flatten(out)[0]):
            self._opaque(name, [c for _, c in acts] + [c for _, c in params])
        return out

    def _move(self, func, name, args, kwargs, out, kind) -> None:
        def swap(t):
            lab = self._label(t)
            if lab is not None and lab[0] == kind:
                return lab[1]
            return torch.full(t.shape, -1, dtype=torch.long)

        if name in CAST:
            lab = self._label(args[0])
            if isinstance(out, torch.Tensor) and lab is not None and out.shape == lab[1].shape:
                self._set(out, lab[0], lab[1])
            return
        if name in JOIN:
            tensors = [swap(t) for t in args[0]]
            labels = func(tensors, *args[1:], **kwargs)
        else:
            if self._label(args[0]) is None:
                self._opaque(name, [lab[1] for t in args[1:] if (lab := self._label(t)) is not None])
                return
            labels = func(swap(args[0]), *args[1:], **kwargs)
        outs, _spec = tree_flatten(out)
        labs, _lspec = tree_flatten(labels)
        for o, lab in zip(outs, labs, strict=False):
            if isinstance(o, torch.Tensor) and isinstance(lab, torch.Tensor) and o.shape == lab.shape:
                self._set(o, kind, lab)

    def _elementwise(self, name, args, out, acts, params) -> None:
        if not isinstance(out, torch.Tensor):
            return
        shape = out.shape
        if acts:
            codes = [c.expand(shape) if c.shape != shape else c for _, c in acts]
            if any(c.shape != shape for c in codes):
                self._opaque(name, [c for _, c in acts])
                return
            for other in codes[1:]:
                self.trace.union(torch.stack([codes[0].reshape(-1), other.reshape(-1)], 1))
            for _t, pcodes in params:
                pairs = torch.stack([pcodes.expand(shape).reshape(-1), codes[0].reshape(-1)], 1)
                pairs = torch.unique(pairs[(pairs >= 0).all(1)], dim=0)
                src = int(pairs[0, 0]) >> SHIFT if len(pairs) else None
                if src is not None:
                    param = self.trace.sources[src].param
                    pairs[:, 0] -= src << SHIFT
                    self.trace.uses.append(ParamUse(param, self.stack[-1], pairs))
            self._set(out, "act", codes[0])
        else:
            codes = params[0][1]
            if codes.shape != shape:
                codes = codes.expand(shape) if len(codes.shape) <= len(shape) else None
            if codes is not None:
                self._set(out, "param", codes)

    def _setitem(self, args) -> None:
        target, index, value = args
        lab = self._label(target)
        vlab = self._label(value)
        if lab is None and (vlab is None or vlab[0] != "act"):
            return
        codes = lab[1].clone() if lab is not None else torch.full(target.shape, -1, dtype=torch.long)
        codes[index] = vlab[1] if vlab is not None and vlab[0] == "act" else -1
        self._set(target, "act", codes)

    def _reduce(self, name, args, kwargs, out, acts, params) -> None:
        x, codes = acts[0]
        if len(acts) > 1 or x is not args[0]:
            self._opaque(name, [c for _, c in acts])
            return
        if name in ("layer_norm", "rms_norm", "group_norm"):
            shape = args[1] if len(args) > 1 else kwargs.get("normalized_shape")
            dims = tuple(range(x.dim() - len(shape), x.dim())) if name != "group_norm" else (1,)
        else:
            dim = kwargs.get("dim", args[1] if len(args) > 1 and not isinstance(args[1], torch.Tensor) else None)
            dims = tuple(range(x.dim())) if dim is None else (dim,) if isinstance(dim, int) else tuple(dim)
        dims = tuple(d % x.dim() for d in dims)
        keep = [d for d in range(x.dim()) if d not in dims]
        rows = codes.permute(*keep, *dims).reshape(-1, max(1, int(torch.tensor([x.shape[d] for d in dims]).prod())))
        self.trace.stats.append(Stat(name, self.stack[-1], torch.unique(rows, dim=0)))
        for _t, pcodes in params:  # layer_norm weight / bias
            if pcodes.dim() == 1 and pcodes.numel() == codes.shape[-1]:
                pairs = torch.stack([pcodes.expand(codes.shape).reshape(-1), codes.reshape(-1)], 1)
                src = int(pcodes[0]) >> SHIFT
                pairs = torch.unique(pairs, dim=0)
                pairs[:, 0] -= src << SHIFT
                self.trace.uses.append(ParamUse(self.trace.sources[src].param, self.stack[-1], pairs))
        if name in NORMALIZE and isinstance(out, torch.Tensor) and out.shape == codes.shape:
            self._set(out, "act", codes)

    def _linear(self, args, kwargs, out, acts) -> None:
        x, weight = args[0], args[1] if len(args) > 1 else kwargs["weight"]
        bias = args[2] if len(args) > 2 else kwargs.get("bias")
        lab = self.labels.get(id(x))
        if id(weight) not in self.names:
            self._opaque("linear (weight not a parameter)", [c for _, c in acts])
            return
        param = self.names[id(weight)]
        if lab is not None:
            if lab[0] != "act":
                self._opaque("linear", [lab[1]])
            else:
                rows = lab[1].reshape(-1, x.shape[-1])
                if not (rows == rows[:1]).all():
                    self._opaque("linear (input channels differ across tokens)", [lab[1]])
                else:
                    self.trace.sinks.append(Sink(param, self.stack[-1], rows[0].clone()))
        bias_name = self.names.get(id(bias)) if bias is not None else None
        src = self._new_source("linear", param, out.shape[-1], bias_name)
        self._set(out, "act", ((src << SHIFT) + torch.arange(out.shape[-1])).expand(out.shape))

    def _embedding(self, args, kwargs, out, acts) -> None:
        weight = args[1] if len(args) > 1 else kwargs["weight"]
        if id(weight) not in self.names:
            return
        src = self._new_source("embed", self.names[id(weight)], out.shape[-1])
        self._set(out, "act", ((src << SHIFT) + torch.arange(out.shape[-1])).expand(out.shape))

    def _attention(self, args, kwargs, out, acts) -> None:
        names = ("query", "key", "value")
        qkv = [args[i] if len(args) > i else kwargs.get(names[i]) for i in range(3)]
        labels = [self.labels.get(id(t)) for t in qkv]
        if any(lab is None or lab[0] != "act" or t.dim() != 4 for t, lab in zip(qkv, labels, strict=True)):
            self._opaque("scaled_dot_product_attention", [c for _, c in acts])
            return
        heads, per = [], []
        for (_, codes), _t in zip(labels, qkv, strict=True):
            first = codes[0, :, 0, :]
            if not (codes == first[None, :, None, :]).all():
                self._opaque("scaled_dot_product_attention (channels differ across tokens)", [codes])
                return
            heads.append(first.shape[0])
            per.append(first)
        n = heads[0]
        if heads[1] != n:  # enable_gqa: query head i reads K/V head i // (n / n_kv)
            if n % heads[1] or not kwargs.get("enable_gqa", False):
                self._opaque("scaled_dot_product_attention", [c for _, c in acts])
                return
            per[1] = per[1].repeat_interleave(n // heads[1], 0)
            per[2] = per[2].repeat_interleave(n // heads[2], 0)
        dv = out.shape[-1]
        src = self._new_source("attention", None, n * dv)
        self.trace.attentions.append(Attention(self.stack[-1], per[0], per[1], per[2], src))
        codes = (src << SHIFT) + torch.arange(n * dv).view(1, n, 1, dv)
        self._set(out, "act", codes.expand(out.shape))


@torch.no_grad()
def trace_model(model: nn.Module, tokens: int = 6) -> Trace:
    """Run ``model`` once on ``tokens`` random token ids under a :class:`Tracer`.

    A transformers model loaded with another attention implementation (``eager``,
    ``flash_attention_2``) is traced with ``sdpa``, the call the tracer follows: the
    implementations compute the same function, and the check that :func:`llmp.prune` runs on
    what is discovered uses the model's own.
    """
    vocab = model.get_input_embeddings().num_embeddings
    ids = torch.randint(0, vocab, (1, tokens), generator=torch.Generator().manual_seed(0))
    device = next(model.parameters()).device
    tracer = Tracer(model)
    implementation = getattr(getattr(model, "config", None), "_attn_implementation", None)
    switch = implementation not in (None, "sdpa") and hasattr(model, "set_attn_implementation")
    if switch:
        model.set_attn_implementation("sdpa")
    try:
        with tracer:
            try:
                model(input_ids=ids.to(device), use_cache=False)
            except TypeError:  # a custom model without the `use_cache` argument
                model(input_ids=ids.to(device))
    finally:
        if switch:
            model.set_attn_implementation(implementation)
    return tracer.trace
