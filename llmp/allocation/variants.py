"""The search's database: each layer's pruned variants, built from the dense layer's statistics
when first asked for and kept while memory allows, and the stitching of a candidate from them
(a candidate is a set of swapped layers, never a model pruned again)."""

from __future__ import annotations

import copy
import tempfile
from collections import OrderedDict
from pathlib import Path

import torch
from transformers import PreTrainedModel

from llmp import surgery
from llmp.importance import activations
from llmp.plan import choose
from llmp.pruning import compensation
from llmp.pruning.layercalls import compute_dtype, computing, layer_inputs, run_layer
from llmp.structure import Structure, adapter_for

Counts = dict[str, int]
"""Group name → elements removed in each of its blocks."""


class Database:
    """The pruned variants of each layer, built from the dense layer's statistics when first
    asked for, and the stitching of a candidate from them."""

    def __init__(self, model: PreTrainedModel, part: Structure, config, calibration: torch.Tensor, settings):
        self.model, self.config = model, config
        self.adapter = adapter_for(model)
        self.layers = self.adapter.layers(model)
        self.dense = list(self.layers)
        self.parts: dict[int, Structure] = {}
        for g in part.groups:
            self.parts.setdefault(g.layer, Structure(part.family, [])).groups.append(g)
        self.owners = activations.projections(part)
        self.compute = compute_dtype(model)
        self.stats, self.scores = {}, {}
        self.variants: OrderedDict[tuple, torch.nn.Module] = OrderedDict()
        self.bytes, self.budget = 0, settings.variant_bytes
        self.spill = Spill(settings.stats_bytes)
        try:
            self._record(calibration)
        except BaseException:
            self.spill.close()
            raise

    @torch.no_grad()
    def _record(self, calibration: torch.Tensor) -> None:
        """Each pruned layer's input statistics and scores, on the dense model's activations."""
        inputs = layer_inputs(self.model, calibration, self.config.batch_size, self.compute)
        last = max(self.parts)
        gram = self.config.compensate == "lstsq"
        for i, layer in enumerate(self.dense[: last + 1]):
            part = self.parts.get(i)
            owners = [self.owners[g.name] for g in part.groups] if part else []
            with computing(layer, self.compute), activations.recording(self.model, owners, gram) as stats:
                outputs = run_layer(layer, inputs, whole=True)
            if part is not None:
                self.stats[i] = self.spill.keep(i, stats)
                self.scores.update(activations.score(self.model, part, stats, self.config.criterion))
            inputs = outputs

    @torch.no_grad()
    def variant(self, i: int, counts: Counts) -> torch.nn.Module:
        part = self.parts[i]
        key = (i, *(counts[g.name] for g in part.groups))
        if not any(key[1:]):
            return self.dense[i]
        if key in self.variants:
            self.variants.move_to_end(key)
            return self.variants[key]
        plan = {g.name: choose(g, self.scores[g.name], counts[g.name]) for g in part.groups if counts[g.name]}
        layer = copy.deepcopy(self.dense[i])
        self.layers[i] = layer
        try:
            with computing(layer, self.compute):
                stats = {name: copy.copy(s) for name, s in self.stats[i].items()}  # refits release their copy
                refits = compensation.compensation(
                    self.model, part, plan, stats, self.config.compensate, self.config.ridge
                )
                surgery.apply(self.model, part, plan, self.adapter)
                compensation.install(self.model, refits)
        finally:
            self.layers[i] = self.dense[i]
        self.variants[key] = layer
        self.bytes += _bytes(layer)
        while self.bytes > self.budget and len(self.variants) > 1:
            _, old = self.variants.popitem(last=False)
            self.bytes -= _bytes(old)
        return layer

    def stitch(self, counts: Counts) -> None:
        for i in self.parts:
            self.layers[i] = self.variant(i, counts)

    def restore(self) -> None:
        for i, layer in enumerate(self.dense):
            self.layers[i] = layer
        self.adapter.sync(self.model)
        self.variants.clear()
        self.stats.clear()
        self.spill.close()


class Spill:
    """Gram matrices past ``budget`` bytes go to a temporary file, read back by memory map: the page
    cache holds them, and a variant reads only its kept × kept block. (A Llama-2-7B shape's float64
    Grams are 8 · (4096² + 11008²) bytes = 1.1 GB a layer, 33 GB for 30 layers.)"""

    def __init__(self, budget: int) -> None:
        self.budget, self.held, self.folder = budget, 0, None

    def keep(self, layer: int, stats: dict) -> dict:
        grams = {name: s.gram for name, s in stats.items() if s.gram is not None}
        size = sum(g.numel() * g.element_size() for g in grams.values())
        if self.held + size <= self.budget:
            self.held += size
            return stats
        if self.folder is None:
            self.folder = tempfile.TemporaryDirectory(prefix="llmp-allocation-")
        path = Path(self.folder.name) / f"layer{layer}.pt"
        torch.save(grams, path)
        mapped = torch.load(path, mmap=True, weights_only=True)
        for name, s in stats.items():
            if name in mapped:
                s.gram = mapped[name]
        return stats

    def close(self) -> None:
        if self.folder is not None:
            self.folder.cleanup()
            self.folder = None


def _bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())
