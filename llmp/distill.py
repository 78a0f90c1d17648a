"""Recovery by knowledge distillation from the unpruned model.

The recovery loss is a mix of the language-model loss (CE) and a divergence between the
teacher's and the pruned model's next-token distributions::

    loss = weight · T² · KL(teacher ‖ student)  +  (1 − weight) · CE          (forward_kl)

``reverse_kl`` swaps the arguments (mode seeking); ``top_k`` keeps only the teacher's k most
likely tokens, renormalised (the student's log-probabilities stay normalised over the whole
vocabulary). The sum runs over the positions whose next token has a label (``tokens: labels``:
the response of instruction records, every token of packed text) or over every next token that
is not padding (``tokens: all``, prompts included).

Both models run their heads on those positions only: the body's hidden states are taken before
the head (:mod:`llmp.head`), so prompt and padding positions cost no vocabulary-sized logits.

The teacher is frozen and in eval mode, runs without gradients, and is held outside the module's
registered children: it is in no optimizer, state dict, checkpoint or DeepSpeed engine (each
process holds a full copy, in ``dtype``; a resumed fit loads it again).
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llmp.errors import LlmpError
from llmp.head import head_inputs, plain_head
from llmp.validate import literal_problems

log = logging.getLogger(__name__)


@dataclass
class DistillSettings:
    """Distillation from a teacher (by default the model as loaded, before any pruning).

    Attributes:
        teacher: the teacher's spec (folder, built-in name, ``.gguf``, hub id; same tokenizer);
            ``None``: the model as loaded, before pruning (for a folder written by llmp, the
            original model it was pruned from).
        loss: ``forward_kl`` (KL(teacher ‖ student), Minitron's choice) or ``reverse_kl``.
        weight: share of the distillation term; the language-model loss gets ``1 - weight``.
        temperature: softens both distributions; the divergence is scaled by its square.
        top_k: keep only the teacher's k most likely tokens (``forward_kl``); ``None``: all.
        tokens: ``labels`` (positions whose next token has a label: the response of instruction
            records, all of packed text) or ``all`` (every next token that is not padding).
        dtype: the teacher's weights: ``auto`` (the model's), ``float32``, ``bfloat16``, ``float16``.
        cache: a safetensors file of the teacher's ``top_k`` logits of every training example,
            written by the first run and read by later ones, which then hold no teacher and run
            no teacher forward (:mod:`llmp.teacher_cache`); needs ``top_k``.
    """

    teacher: str | None = None
    loss: Literal["forward_kl", "reverse_kl"] = "forward_kl"
    weight: float = 1.0
    temperature: float = 1.0
    top_k: int | None = None
    tokens: Literal["labels", "all"] = "labels"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    cache: str | None = None

    def problems(self) -> list[str]:
        """What is wrong with the settings, each naming the key, the value and the fix."""
        found = literal_problems(self, "distill.")
        if not 0 <= self.weight <= 1:
            found.append(f"`distill.weight` must be in [0, 1] (the distillation share); got {self.weight}")
        if not self.temperature > 0:
            found.append(f"`distill.temperature` must be > 0; got {self.temperature}")
        if self.top_k is not None and (self.top_k < 1 or self.loss != "forward_kl"):
            found.append(
                f"`distill.top_k` must be >= 1 and needs `loss: forward_kl`; got {self.top_k} with {self.loss}"
            )
        if self.cache is not None and self.top_k is None:
            found.append(
                f"`distill.cache` {self.cache} keeps the teacher's top-k logits: set `distill.top_k` (e.g. 64)"
            )
        if self.cache is not None:
            found += _cache_path_problems(self.cache)
        return found


def _cache_path_problems(cache: str) -> list[str]:
    """A cache file is read if it exists, else written after the teacher's pass: its place is
    checked now, as an output's is, not after the pass."""
    from llmp.outcheck import check_output_path

    path = Path(cache).expanduser()
    if path.is_dir():
        return [f"`distill.cache` {cache} is a folder; name a file in it, e.g. {path / 'teacher.safetensors'}"]
    if path.is_file():
        return []
    try:
        check_output_path(path, flag="distill.cache")
    except LlmpError as err:
        return [str(err)]
    return []


class Teacher:
    """A frozen model that gives next-token logits (not an ``nn.Module``, so a LightningModule
    holding it does not register, train, save or shard it)."""

    def __init__(self, model: nn.Module, dtype: str = "auto", source: str = "the model before pruning") -> None:
        model.eval().requires_grad_(False)
        model.config.use_cache = False
        self.model, self.dtype, self.source = model, dtype, source

    @classmethod
    def for_student(cls, settings: DistillSettings, student: nn.Module, spec: str, tokenizer=None) -> Teacher:
        """The teacher ``settings`` names for ``student`` (whose tokenizer is ``tokenizer``), loaded
        from ``spec`` (the student's spec) before any pruning: a copy of it, or the model an llmp
        folder was pruned from.

        Raises:
            LlmpError: the teacher's vocabulary or tokenizer differs from the student's.
        """
        from llmp.models import load_model

        source = settings.teacher or original_of(spec)
        if source is None:
            return cls(copy.deepcopy(student), settings.dtype)
        model, theirs = load_model(source)
        teacher = cls(model, settings.dtype, source)
        teacher.check_vocabulary(student)
        if tokenizer is not None:
            teacher.check_tokenizer(theirs, tokenizer)
        return teacher

    def check_vocabulary(self, student: nn.Module) -> None:
        """Raises LlmpError: the teacher's vocabulary differs from the student's."""
        mine, theirs = (m.get_output_embeddings().weight.shape[0] for m in (self.model, student))
        if mine != theirs:
            raise LlmpError(
                f"`distill.teacher` {self.source} has a vocabulary of {mine:,} tokens, the model {theirs:,}: "
                "the teacher must use the model's tokenizer"
            )

    def check_tokenizer(self, mine, students) -> None:
        """Raises LlmpError: the same number of tokens, but other tokens (Llama 2 and Mistral both
        have 32,000): token ``i`` must be the same text for both, or the logits compare nothing."""
        ours, theirs = mine.get_vocab(), students.get_vocab()
        if ours != theirs:
            differ = sorted((t for t, i in ours.items() if theirs.get(t) != i), key=ours.__getitem__)
            token = differ[0] if differ else next(t for t in theirs if t not in ours)
            raise LlmpError(
                f"`distill.teacher` {self.source} has another tokenizer than the model ({len(differ):,} tokens "
                f"differ, e.g. {token!r}: id {ours.get(token)} for the teacher, {theirs.get(token)} for the model): "
                "the teacher must use the model's tokenizer"
            )

    def to(self, like: nn.Module, rank: int = 0) -> None:
        """Onto ``like``'s device, in ``dtype`` (``auto``: ``like``'s parameter dtype); once."""
        reference = next(like.parameters())
        dtype = reference.dtype if self.dtype == "auto" else getattr(torch, self.dtype)
        current = next(self.model.parameters())
        if current.device != reference.device or current.dtype != dtype:
            self.model.to(device=reference.device, dtype=dtype)
            size = sum(p.numel() for p in self.model.parameters())
            log.info(
                "rank %d holds the teacher (%s, %s parameters) whole, in %s", rank, self.source, f"{size:,}", dtype
            )

    @torch.no_grad()
    def logits(self, batch: dict[str, Tensor], rows: Tensor) -> Tensor:
        """``[N, V]`` float32 logits of the positions ``rows`` (``[B, L-1]`` bool) selects."""
        return position_logits(self.model, batch, rows).float()


def position_logits(model: nn.Module, batch: dict[str, Tensor], rows: Tensor) -> Tensor:
    """``[N, V]`` logits at the positions ``rows`` (``[B, L-1]`` bool) selects, the head run on
    those positions only where the model's logits are its head's output."""
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch.get("attention_mask")}
    head = plain_head(_unwrapped(model))
    if head is None:
        return model(**inputs, use_cache=False).logits[:, :-1][rows]
    return head(head_inputs(model, head, **inputs)[:, :-1][rows])


def _unwrapped(model: nn.Module) -> nn.Module:
    get = getattr(model, "get_base_model", None)  # peft
    return get() if callable(get) else model


def original_of(spec: str) -> str | None:
    """The model a folder written by llmp was pruned from; ``None`` for any other spec."""
    from llmp.record import REPORT, read_record

    folder = Path(spec).expanduser()
    if not (folder / REPORT).is_file():
        return None
    record = read_record(folder)
    if not record.model or record.model == spec:
        return None
    source = Path(record.model).expanduser()
    if not source.is_absolute() and record.model.startswith((".", "~")) and not source.exists():
        raise LlmpError(
            f"{folder} was pruned from {record.model!r}, a path relative to where `llmp prune` ran, and it is not "
            f"at {source.absolute()}: name the teacher with `distill.teacher` (its folder from here)"
        )
    return record.model


def select_rows(batch: dict[str, Tensor], distill: DistillSettings | None = None) -> Tensor:
    """``[B, L-1]`` bool: the positions the loss covers (see the module docstring)."""
    if distill is None or distill.tokens == "labels":
        return batch["labels"][:, 1:] != -100
    mask = batch.get("attention_mask")
    mask = torch.ones_like(batch["input_ids"], dtype=torch.bool) if mask is None else mask.bool()
    return mask[:, :-1] & mask[:, 1:]


def recovery_loss(
    model: nn.Module,
    batch: dict[str, Tensor],
    distill: DistillSettings | None = None,
    teacher: Teacher | None = None,
    cache=None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The training loss of a batch (``input_ids``, ``attention_mask``, ``labels``) and its parts.

    Without ``distill`` it is the mean next-token cross-entropy over the labelled tokens, as
    ``model(**batch).loss``. With it, see the module docstring; the teacher's logits come from
    ``teacher``, or from ``cache`` (a :class:`~llmp.teacher_cache.TeacherCache`, by the batch's
    ``example`` indices).
    """
    labels = batch["labels"][:, 1:]
    labelled = labels != -100
    rows = select_rows(batch, distill)
    logits = position_logits(model, batch, rows).float()
    targets, has_label = labels[rows], labelled[rows]
    if distill is None:
        return _cross_entropy(logits, targets, has_label), {}
    temperature = distill.temperature
    fused = cache is None and distill.loss == "forward_kl" and distill.top_k is None
    if fused:  # the default: one pass that keeps only the gradient (see ForwardKL)
        kd = ForwardKL.apply(logits, teacher.logits(batch, rows), temperature) * temperature**2
        if distill.weight < 1:
            ce = _cross_entropy(logits, targets, has_label)
        else:  # for the log only
            with torch.no_grad():
                ce = _cross_entropy(logits, targets, has_label)
    else:
        log_probs = logits.log_softmax(-1)
        ce = F.nll_loss(log_probs[has_label], targets[has_label]) if has_label.any() else logits.sum() * 0
        student = log_probs if temperature == 1 else (logits / temperature).log_softmax(-1)
        if cache is not None:
            top, index = cache.lookup(batch["example"], rows)
            kd = top_divergence(student, top / temperature, index) * temperature**2
        else:
            kd = divergence(student, teacher.logits(batch, rows) / temperature, distill.loss, distill.top_k)
            kd = kd * temperature**2
    loss = distill.weight * kd + (1 - distill.weight) * ce if distill.weight < 1 else kd
    return loss, {"ce": ce.detach(), "kd": kd.detach()}


def _cross_entropy(logits: Tensor, targets: Tensor, has_label: Tensor) -> Tensor:
    if not has_label.any():
        return logits.sum() * 0
    return F.cross_entropy(logits[has_label], targets[has_label])


class ForwardKL(torch.autograd.Function):
    """Mean over rows of KL(softmax(t/T) ‖ softmax(s/T)) for ``[N, V]`` student logits ``s`` and
    teacher logits ``t``. Its gradient, ``(softmax(s/T) − softmax(t/T)) / (N·T)``, is formed in the
    forward pass in the buffer of the student's log-probabilities and is all that is kept: about
    half the vocabulary-sized passes and buffers of the same loss through autograd."""

    @staticmethod
    def forward(ctx, student: Tensor, teacher: Tensor, temperature: float) -> Tensor:
        rows = max(1, student.shape[0])
        log_t = (teacher / temperature).log_softmax(-1) if temperature != 1 else teacher.log_softmax(-1)
        log_s = (student / temperature).log_softmax(-1) if temperature != 1 else student.log_softmax(-1)
        p_t = log_t.exp()
        loss = torch.sub(log_t, log_s).mul_(p_t).sum() / rows
        ctx.save_for_backward(log_s.exp_().sub_(p_t).div_(rows * temperature))
        return loss

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        (grad,) = ctx.saved_tensors
        return grad * grad_output, None, None


def divergence(student_log_probs: Tensor, teacher_logits: Tensor, loss: str = "forward_kl", top_k=None) -> Tensor:
    """Mean over rows of KL(teacher ‖ student) (``forward_kl``) or KL(student ‖ teacher)
    (``reverse_kl``); with ``top_k``, the teacher keeps its k most likely tokens, renormalised."""
    rows = max(1, student_log_probs.shape[0])
    if top_k is not None:
        top, index = teacher_logits.topk(min(top_k, teacher_logits.shape[-1]), dim=-1)
        return top_divergence(student_log_probs, top, index)
    teacher = teacher_logits.log_softmax(-1)
    if loss == "forward_kl":
        return F.kl_div(student_log_probs, teacher, log_target=True, reduction="sum") / rows
    return (student_log_probs.exp() * (student_log_probs - teacher)).sum() / rows


def top_divergence(student_log_probs: Tensor, top_logits: Tensor, index: Tensor) -> Tensor:
    """Mean over rows of KL(teacher ‖ student) over the teacher's top tokens ``index`` (``[N, k]``,
    their logits ``top_logits`` renormalised)."""
    rows = max(1, student_log_probs.shape[0])
    teacher = top_logits.log_softmax(-1)
    return F.kl_div(student_log_probs.gather(-1, index), teacher, log_target=True, reduction="sum") / rows
