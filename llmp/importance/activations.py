"""Statistics of the output projections' inputs, and the activation criteria scored from them.

Every head / KV group and MLP channel writes into the residual stream through the input columns
of one output projection (``o_proj``, ``down_proj``: the group's ``writes`` slice). A forward over
the calibration text (no backward) records, per input channel ``j`` of those projections, the
token count, ``Σx_j`` and ``Σx_j²`` (and for the least-squares refit the whole ``XᵀX``). The
criteria (:class:`~llmp.importance.criteria.Flap`, :class:`~llmp.importance.criteria.Wanda`) score
each channel from them, and an element sums its channels (a head owns ``head_dim`` of them);
:mod:`llmp.pruning.compensation` uses the same statistics.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from llmp.errors import LlmpError
from llmp.importance.criteria import CRITERIA
from llmp.structure import Group, Kind, Structure, adapter_for

log = logging.getLogger(__name__)


@dataclass
class InputStats:
    """Running sums over the tokens seen by one linear module's input channels (float64)."""

    count: int
    sum: torch.Tensor
    sum_squares: torch.Tensor
    gram: torch.Tensor | None = None  # Σ x xᵀ, for lstsq

    @property
    def mean(self) -> torch.Tensor:
        return self.sum / max(self.count, 1)

    @property
    def variance(self) -> torch.Tensor:
        return (self.sum_squares / max(self.count, 1) - self.mean**2).clamp_min(0)

    @property
    def norm(self) -> torch.Tensor:
        return self.sum_squares.sqrt()

    def covariance(self, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> torch.Tensor:
        """The inputs' covariance, or its ``rows`` × ``cols`` block (index tensors), made in one
        allocation of the block's size."""
        mean, n = self.mean, max(self.count, 1)
        if rows is None or cols is None:
            return torch.addr(self.gram, mean, mean, beta=1 / n, alpha=-1)
        block = self.gram[rows[:, None], cols]
        return block.addr_(mean[rows], mean[cols], beta=1 / n, alpha=-1)

    def add(self, x: torch.Tensor) -> None:
        # Sums over one batch in float32 (no float64 copy of the activations), across batches in float64.
        x = x.reshape(-1, x.shape[-1]).float()
        self.count += x.shape[0]
        self.sum += x.sum(0).double()
        self.sum_squares += (x * x).sum(0).double()
        if self.gram is not None:
            # x_bᵀ x in float32 for a band of rows at a time (32 MiB of float64), summed into the float64
            # Gram: neither a whole float32 product (half the Gram) nor its float64 copy (the Gram) exists.
            rows = max(1, (32 << 20) // (8 * x.shape[1]))
            for start in range(0, x.shape[1], rows):
                self.gram[start : start + rows] += x[:, start : start + rows].T @ x


def projections(structure: Structure) -> dict[str, str]:
    """Group name → the module whose input columns are the group's ``writes`` slice.

    Raises:
        LlmpError: a group of another kind than heads / MLP channels, or a ``writes`` slice that
            is not the input side of one ``nn.Linear`` weight.
    """
    found = {}
    for group in structure.groups:
        if group.kind not in (Kind.KV_GROUPS, Kind.QUERY_HEADS, Kind.MLP):
            raise LlmpError(
                f"the activation criteria and compensation work on heads and MLP channels (`scope` block); "
                f"got a group of {group.kind.value}: use criterion taylor and `compensate` none there"
            )
        writes = [s for s in group.slices if s.writes]
        if len(writes) != 1 or not writes[0].param.endswith(".weight") or writes[0].dim != 1:
            raise LlmpError(
                f"group {group.name}: its output is not the input columns of one linear weight, so the "
                "activation criteria and compensation cannot be used for this family"
            )
        found[group.name] = writes[0].param.removesuffix(".weight")
    return found


@contextmanager
def recording(model: nn.Module, modules: list[str], gram: bool = False) -> Iterator[dict[str, InputStats]]:
    """Record :class:`InputStats` of each of ``modules``' inputs during the forwards run inside."""
    stats, handles = {}, []
    for name in dict.fromkeys(modules):
        module = model.get_submodule(name)
        if not isinstance(module, nn.Linear):
            raise LlmpError(f"{name} is a {type(module).__name__}, not a linear layer: its inputs cannot be recorded")
        n = module.in_features
        zeros = torch.zeros(n, dtype=torch.float64, device=module.weight.device)
        stats[name] = InputStats(0, zeros.clone(), zeros.clone(), zeros.new_zeros(n, n) if gram else None)
        handles.append(module.register_forward_pre_hook(lambda _m, args, s=stats[name]: s.add(args[0].detach())))
    try:
        yield stats
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def collect(
    model: nn.Module, modules: list[str], calibration: torch.Tensor, batch_size: int | None = None, gram: bool = False
) -> dict[str, InputStats]:
    """Input statistics of ``modules`` over a forward of ``calibration`` (``[N, L]`` token ids)."""
    require_calibration(calibration)
    was_training = model.training
    model.eval()
    # Nothing after the last recorded layer is needed: stop there (no logits for every token).
    adapter = adapter_for(model)
    prefix = adapter.layers_path + "."
    owners = [int(name.removeprefix(prefix).partition(".")[0]) for name in modules if name.startswith(prefix)]
    stop = adapter.layers(model)[max(owners)].register_forward_hook(_stop) if owners else None
    try:
        with recording(model, modules, gram) as stats:
            run_batches(model, calibration, batch_size)
    finally:
        model.train(was_training)
        if stop is not None:
            stop.remove()
    return stats


class Stop(Exception):
    """Raised by a hook once the forward has given what is needed: :func:`run_batches` ends it there."""


def _stop(*_args) -> None:
    raise Stop


def run_batches(model: nn.Module, calibration: torch.Tensor, batch_size: int | None) -> None:
    """Forward ``calibration`` in batches of ``batch_size`` (``None``: one), each ended early by a
    hook raising :class:`Stop`."""
    device = model.get_input_embeddings().weight.device
    step = calibration.shape[0] if batch_size is None else max(1, batch_size)
    for start in range(0, calibration.shape[0], step):
        try:
            model(input_ids=calibration[start : start + step].to(device), use_cache=False)
        except Stop:
            pass


MIN_STATISTICS_TOKENS = 512
"""Below this, each channel's variance and the refit's covariance rest on too few tokens to rank or
refit anything (a warning, not a refusal: a test or a first try may want a tiny calibration)."""


def require_calibration(calibration: torch.Tensor | None) -> None:
    """Warns when the tokens are fewer than :data:`MIN_STATISTICS_TOKENS`.

    Raises:
        LlmpError: no calibration tokens.
    """
    if calibration is None or calibration.numel() == 0:
        raise LlmpError(
            "the activation criteria (flap, wanda) and compensation need calibration tokens and `calibration` "
            "is empty: pass token ids (e.g. from llmp.data.calibration_samples)"
        )
    if calibration.numel() < MIN_STATISTICS_TOKENS:
        log.warning(
            "calibration holds %d tokens: activation statistics (each channel's variance, the least-squares "
            "refit) from so few are noise; give at least %d (num_samples x seq_len; the default is 16 x 128)",
            calibration.numel(),
            MIN_STATISTICS_TOKENS,
        )


def group_scores(group: Group, channels: torch.Tensor) -> torch.Tensor:
    """Per-element scores of ``group`` from its output projection's per-channel scores."""
    (writes,) = [s for s in group.slices if s.writes]
    index = writes.indices(torch.arange(group.size))
    return channels[index].view(group.size, writes.width).sum(1)


def score(
    model: nn.Module, structure: Structure, stats: dict[str, InputStats], criterion: str
) -> dict[str, torch.Tensor]:
    """Group name → float64 scores of its elements (higher = more important), by an activation
    criterion of :data:`llmp.importance.criteria.CRITERIA`."""
    spec = CRITERIA[criterion]
    owners = projections(structure)
    return {
        g.name: group_scores(g, spec.channel_scores(model.get_submodule(owners[g.name]).weight, stats[owners[g.name]]))
        for g in structure.groups
    }
