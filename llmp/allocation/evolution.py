"""The searched allocation: an evolutionary search over how many elements each layer loses,
judged by how far the pruned model's next-token distribution moves from the dense model's.

The idea is EvoPress's (Sieberling et al., 2024) and Týr-the-Pruner's: every layer's pruned
variants form a database, a candidate is stitched from them by swapping whole layers (no
re-pruning), and a mutation moves one level from one layer to another of the same kind, so the
parameter budget holds. Here:

- a layer's variant is built on demand, from the dense layer's own calibration statistics
  (scores and the least-squares refit of the dense inputs), and kept while memory allows
  (:mod:`llmp.allocation.variants`);
- fitness is KL(dense ‖ candidate) over the dense model's top-k tokens at each position of the
  calibration samples, cached once; offspring are ranked on the first ``first_samples`` samples,
  the survivors on all of them (staged selection), and the parent is replaced only by a better
  one, so the recorded fitness never rises;
- a move of a coarse kind (query heads) may be paid for in MLP channels (:meth:`_Space.repair`),
  so the split between kinds is searched too.

The chosen counts are then applied by the layer-by-layer pass as any other allocation.
"""

from __future__ import annotations

import copy
import logging
import math
import random
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from llmp.allocation.variants import Counts, Database
from llmp.errors import LlmpError
from llmp.structure import Group, Kind, Structure

log = logging.getLogger(__name__)


LEVELS = 32
"""An MLP move is 1/32 of the layer's channels (rounded to ``round_to``): fine enough to matter,
coarse enough that a few moves change a candidate visibly."""


@dataclass
class SearchSettings:
    """Bounds and sizes of the search.

    Attributes:
        seconds: stop starting generations after this long (the database included).
        generations: stop after this many (``None``: only ``seconds`` bounds it).
        offspring: candidates made from the parent per generation.
        survivors: of them, those scored again on every sample.
        holdout: calibration samples the candidates are judged on, kept out of the statistics their
            layers are pruned with (judged on those, the search would reward the refit's overfit).
        first_samples: of them, those of the first, cheap ranking.
        top_k: the dense model's most likely tokens kept per position for the KL.
        variant_bytes: memory for the layers' pruned variants (least recently used go first).
        stats_bytes: memory for the dense layers' Gram matrices (the refit's statistics); those
            beyond it go to a temporary file (``TMPDIR``) and are read back by memory map.
        seed: of the mutations.
    """

    seconds: float = 600.0
    generations: int | None = None
    offspring: int = 16
    survivors: int = 4
    holdout: int = 16
    first_samples: int = 2
    top_k: int = 64
    variant_bytes: int = 1 << 30
    stats_bytes: int = 4 << 30
    seed: int = 0


@dataclass
class SearchResult:
    """What the search chose and how it went."""

    counts: Counts
    fitness: list[float] = field(default_factory=list)  # the parent's KL after each generation
    seed: str = ""  # the name of the starting allocation chosen
    seed_fitness: float = math.nan
    generations: int = 0
    evaluated: int = 0
    seconds: float = 0.0


class _Space:
    """The allowed counts of each group, their parameter cost, and the moves between them."""

    def __init__(self, groups: list[Group], params: dict[str, torch.Tensor], settings, target: int) -> None:
        self.groups = {g.name: g for g in groups}
        self.target = target
        self.cost = {g.name: int(params[g.name][0]) * g.blocks for g in groups}  # per element of every block
        self.step, self.most = {}, {}
        for g in groups:
            b = g.block_size
            fine = settings.round_to if g.kind in (Kind.MLP, Kind.HIDDEN) else 1
            self.step[g.name] = fine  # the finest change that keeps the count deployable
            most = b - max(1, math.ceil(settings.min_keep * b))
            while fine > 1 and most > 0 and ((b - most) % fine or b - most < fine):
                most -= 1
            self.most[g.name] = most
        self.unit = {
            name: max(self.step[name], round(self.groups[name].block_size / LEVELS / self.step[name]) * self.step[name])
            if self.groups[name].kind in (Kind.MLP, Kind.HIDDEN)
            else 1
            for name in self.groups
        }
        by_kind: dict[Kind, list[str]] = {}
        for g in groups:
            by_kind.setdefault(g.kind, []).append(g.name)
        self.by_kind = by_kind
        self.finest = min(by_kind, key=lambda k: max(self.cost[n] * self.step[n] for n in by_kind[k]))

    def removed(self, counts: Counts) -> int:
        return sum(self.cost[n] * k for n, k in counts.items())

    def valid(self, name: str, k: int) -> bool:
        """Within what the group may lose, its kept count a multiple of ``round_to`` (or untouched)."""
        return 0 <= k <= self.most[name] and (k == 0 or (self.groups[name].block_size - k) % self.step[name] == 0)

    def mutate(self, counts: Counts, rng: random.Random) -> Counts:
        """One to three same-kind moves (budget kept), and now and then a coarse-kind move paid
        in the finest kind."""
        child = dict(counts)
        kinds = [k for k, names in self.by_kind.items() if len(names) > 1]
        for _ in range(rng.randint(1, 3)):
            if not kinds:
                break
            up, down = rng.sample(self.by_kind[rng.choice(kinds)], 2)
            u = self.unit[up]
            if self.valid(up, child[up] + u) and self.valid(down, child[down] - u):
                child[up] += u
                child[down] -= u
        coarse = [k for k in self.by_kind if k is not self.finest]
        if coarse and rng.random() < 0.3:
            name = rng.choice(self.by_kind[rng.choice(coarse)])
            k = child[name] + rng.choice((-1, 1))
            if self.valid(name, k):
                child[name] = k
        return self.repair(child, rng)

    def repair(self, counts: Counts, rng: random.Random) -> Counts:
        """Counts of the finest kind moved one step at a time, in random groups, until the removed
        parameters are as close to the target as those steps allow."""
        names = list(self.by_kind[self.finest])
        gap = self.target - self.removed(counts)
        while names:
            name = rng.choice(names)
            step = self.step[name] if gap > 0 else -self.step[name]
            k = counts[name] + step
            cost = self.cost[name] * step
            if abs(gap - cost) >= abs(gap) or not self.valid(name, k):
                names.remove(name)
                continue
            counts[name] = k
            gap -= cost
        return counts


class DenseKL:
    """KL(dense ‖ model) on the calibration samples, over the dense model's ``top_k`` tokens."""

    def __init__(self, model: PreTrainedModel, tokens: torch.Tensor, top_k: int) -> None:
        self.model, self.tokens = model, tokens
        self.reference = [self._top(row[None], top_k) for row in tokens]

    @torch.no_grad()
    def _logprobs(self, row: torch.Tensor) -> torch.Tensor:
        logits = self.model(input_ids=row, use_cache=False).logits[0]
        return F.log_softmax(logits.float(), dim=-1)

    def _top(self, row: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self._logprobs(row).topk(min(k, self.model.config.vocab_size), dim=-1)

    def __call__(self, samples: int) -> float:
        rows = min(samples, len(self.tokens))
        total = 0.0
        for row, (ref, index) in zip(self.tokens[:rows], self.reference[:rows], strict=True):
            logq = self._logprobs(row[None]).gather(-1, index)
            total += float((ref.exp() * (ref - logq)).sum(-1).mean())
        return total / rows


def search(
    model: PreTrainedModel,
    part: Structure,
    params: dict[str, torch.Tensor],
    seeds: dict[str, Counts],
    target: int,
    config,
    calibration: torch.Tensor,
    settings: SearchSettings,
) -> SearchResult:
    """Counts for ``part``'s groups that remove ``target`` parameters, searched from the best of
    ``seeds`` (name → counts) on the held-out samples.

    ``model`` is left as it was (the dense layers back in place); ``config`` gives the criterion,
    compensation, ridge and plan settings each variant is pruned with. The last
    ``settings.holdout`` calibration samples judge the candidates; the others make the variants.
    """
    if len(calibration) < 2:
        raise LlmpError(
            f"`allocation` search judges candidates on calibration samples kept out of their statistics: "
            f"give at least 2 samples (got {len(calibration)}; 16 or more is usual)"
        )
    start = time.perf_counter()
    was_training = model.training
    model.eval()
    snapshot = copy.deepcopy(vars(model.config))
    rng = random.Random(settings.seed)
    space = _Space(part.groups, params, config, target)
    starts = {name: space.repair({g.name: c.get(g.name, 0) for g in part.groups}, rng) for name, c in seeds.items()}
    held = min(settings.holdout, max(1, len(calibration) // 2))  # half at most: the rest makes the variants
    fitness = DenseKL(model, calibration[-held:], settings.top_k)
    database = Database(model, part, config, calibration[:-held], settings)
    result = SearchResult({})
    try:
        for name, counts in starts.items():
            database.stitch(counts)
            score = fitness(len(fitness.tokens))
            if not score >= result.seed_fitness:  # the first, or a better one (nan compares False)
                result.seed, result.seed_fitness, result.counts = name, score, counts
        result.evaluated = len(starts)
        result.counts = _evolve(space, database, fitness, result.counts, result, settings, rng, start)
    finally:
        database.restore()
        vars(model.config).clear()
        vars(model.config).update(snapshot)
        model.train(was_training)
    result.seconds = round(time.perf_counter() - start, 3)
    log.info(
        "allocation search: KL %.4f (%s) -> %.4f in %d generations (%d candidates, %.0f s)",
        result.seed_fitness,
        result.seed,
        result.fitness[-1] if result.fitness else result.seed_fitness,
        result.generations,
        result.evaluated,
        result.seconds,
    )
    return result


def _evolve(space, database, fitness, parent: Counts, result: SearchResult, settings, rng, start: float) -> Counts:
    """Generations from ``parent`` until the budget is spent; the best counts found. Offspring are
    ranked on the first samples, the survivors judged on all, and the parent replaced only by a
    better one (``result.fitness`` records its KL after each generation)."""
    best, everything = result.seed_fitness, len(fitness.tokens)
    bar = tqdm(total=settings.generations, desc="allocation search", unit="gen", disable=None)
    while settings.generations is None or result.generations < settings.generations:
        generation_start = time.perf_counter()
        offspring = [space.mutate(parent, rng) for _ in range(settings.offspring)]
        offspring = [c for c in offspring if c != parent] or offspring
        first = []
        for child in offspring:
            database.stitch(child)
            first.append(fitness(settings.first_samples))
        ranked = sorted(range(len(offspring)), key=first.__getitem__)[: settings.survivors]
        for index in ranked:
            database.stitch(offspring[index])
            score = fitness(everything)
            if score < best:
                best, parent = score, offspring[index]
        result.evaluated += len(offspring) + len(ranked)
        result.generations += 1
        result.fitness.append(round(best, 6))
        bar.update(1)
        bar.set_postfix(kl=f"{best:.4f}")
        now = time.perf_counter()
        if now - start + (now - generation_start) > settings.seconds:  # the next would end past the budget
            break
    bar.close()
    return parent
