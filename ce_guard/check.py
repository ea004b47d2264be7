"""One parity check as data: reference, budget, comparison and diagnosis on recorded seam inputs.

Lightning-free so that the callback, ``ce-guard parity`` and ``ce-guard replay`` run the very same check.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ce_guard import _dist
from ce_guard.budget import native_error_budget
from ce_guard.contract import CEContract
from ce_guard.diagnosis import Diagnosis, Thresholds, diagnose, judged
from ce_guard.input_checksums import InputChecksums
from ce_guard.parity import ParityReport, SeamOutputs, compare
from ce_guard.reference import DEFAULT_CHUNK_ELEMENTS, ReferenceResult, reference_linear_cross_entropy
from ce_guard.signature import fit_signatures
from ce_guard.step_weight import StepWeight, StepWindow, TrainingContract, step_weight
from ce_guard.transform_fit import candidate_transforms, fit_output_transform


@dataclass(frozen=True)
class SeamRecord:
    """What the seam saw on one step: the inputs, what the fused path produced, and the upstream gradient.

    ``upstream`` is dTotal/dloss as training's backward delivered it (a scalar for mean/sum, per token
    for none); the reference uses it so that loss scaling by the user or by gradient accumulation
    outside the seam does not read as drift. ``given_count`` is the count a ``normalize_by='given_count'``
    mean divided by on this step (transformers' ``num_items_in_batch``); None for every other contract.
    ``input_checksums`` are those of the inputs the loss path was handed (hidden, weight, logits), before its
    forward and after its backward; None where nobody measured them. ``counted`` marks the tokens the training loop
    counts where it counts by a mask of its own (Megatron's ``loss_mask``), the targets' shape; None: the targets
    not ignored.
    """

    hidden: torch.Tensor
    weight: torch.Tensor
    targets: torch.Tensor
    fused: SeamOutputs
    upstream: torch.Tensor | float
    given_count: float | torch.Tensor | None = None
    input_checksums: InputChecksums | None = None
    counted: torch.Tensor | None = None


@dataclass(frozen=True)
class CheckResult:
    report: ParityReport
    diagnosis: Diagnosis
    sampled_tokens: int | None


def check_seam(
    record: SeamRecord,
    contract: CEContract,
    *,
    group_sizes: Mapping[str, int] | None = None,
    sample_tokens: int | None = None,
    budget_tokens: int = 256,
    safety: float = 4.0,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
    thresholds: Thresholds | None = None,
    window: StepWindow | None = None,
    training: TrainingContract | None = None,
) -> CheckResult:
    """Hold ``record`` to ``contract``: run the reference, earn a budget from the native path, compare, diagnose.

    Args:
        record: the seam's inputs and outputs on one step.
        contract: what the fused path declared.
        group_sizes: sizes a scale factor may be traced to (``TP``, ``SP``, ``DP``, ``grad_accum``).
        sample_tokens: if set and smaller than the batch, dL/dh is compared on this many evenly spaced
            tokens only (dL/dW is then skipped); the loss and the normalisation count still see every token.
        budget_tokens: tokens the native path is run on to measure its rounding.
        safety: budget multiplier on the native path's error.
        chunk_elements: the reference's memory bound (logits held at once).
        thresholds: the cut-offs of the verdict and the diagnosis; the calibrated defaults when None.
        window: the accumulation window around the recorded micro-batch; with ``training``, the upstream is held
            to the training contract too (:mod:`ce_guard.step_weight`).
        training: what weight the micro-batch's loss must carry in the optimizer step.
    """
    thresholds = thresholds or Thresholds()
    rows = _sample_rows(record, contract, sample_tokens)
    if rows is None:
        reference = reference_linear_cross_entropy(record.hidden, record.weight, record.targets, contract,
                                                   grad_output=record.upstream, chunk_elements=chunk_elements,
                                                   given_count=record.given_count)
        fused = record.fused
    else:
        reference = _sampled_reference(record, contract, rows, chunk_elements)
        grad = record.fused.grad_hidden
        fused = dataclasses.replace(record.fused, grad_weight=None,
                                    grad_hidden=None if grad is None else grad.reshape(-1, grad.shape[-1])[rows])
    budget = native_error_budget(record.hidden, record.weight, record.targets, contract,
                                 sample_tokens=budget_tokens, safety=safety, given_count=record.given_count)
    report = compare(fused, reference, contract, budget=budget, upstream=record.upstream)
    if _half_precision(record.hidden) or _over_budget_anywhere(report, contract, record.hidden.device):
        hidden, targets = record.hidden, record.targets
        if rows is not None:
            hidden, targets = hidden.reshape(-1, hidden.shape[-1])[rows], targets.reshape(-1)[rows]
        fit = fit_signatures(hidden, record.weight, targets, fused.grad_hidden, reference.grad_hidden,
                             reference.token_weight, contract, loss_factor=report.loss_ratio - 1)
        report = judged(dataclasses.replace(report, signature=fit), thresholds)
    if (rows is None and candidate_transforms(contract, record.upstream)
            and _over_budget_anywhere(report, contract, record.hidden.device)):
        transform = fit_output_transform(record.hidden, record.weight, record.targets, contract, fused.loss,
                                         fused.grad_hidden, record.upstream, budget, given_count=record.given_count,
                                         chunk_elements=chunk_elements)
        report = dataclasses.replace(report, output_transform=transform)
    if window is not None and training is not None:
        report = dataclasses.replace(report, step_weight=_step_weight(record, reference, contract, window, training))
    if record.input_checksums is not None and record.input_checksums.changed:
        report = dataclasses.replace(report, mutated_inputs=record.input_checksums.changed)
    return CheckResult(report, diagnose(report, group_sizes=group_sizes, thresholds=thresholds),
                       None if rows is None else rows.numel())


def _step_weight(record: SeamRecord, reference: ReferenceResult, contract: CEContract, window: StepWindow,
                 training: TrainingContract) -> StepWeight:
    """The recorded micro-batch's summed token weights (what its mean loss is multiplied by in the step) against
    the training contract. Per-token upstreams are summed over the counted tokens of this rank's view."""
    tokens = reference.n_visible
    if contract.reduction == "none":
        visible = reference.targets.reshape(-1) != contract.ignore_index
        if record.counted is not None:  # the training loop's own mask: its tokens are the ones counted
            visible = visible & (record.counted.reshape(-1).to(visible.device) != 0)
            tokens = int(_dist.all_reduce(visible.sum().double(), dist.ReduceOp.SUM,
                                          contract.tp_group if contract.sequence_parallel else None))
        upstream = torch.as_tensor(record.upstream, device=visible.device).reshape(-1).double()
        found = _dist.all_reduce(upstream[visible].sum(), dist.ReduceOp.SUM,
                                 contract.tp_group if contract.sequence_parallel else None)
        found = float(found)
    else:
        found = float(record.upstream) * reference.n_visible / reference.divisor if reference.divisor else 0.0
    return step_weight(found, tokens, window, training)


def with_terms(result: CheckResult, weights: list[StepWeight], *, group_sizes: Mapping[str, int] | None = None,
               thresholds: Thresholds | None = None) -> CheckResult:
    """The seam's check with the loss terms beside it (Megatron's MTP depths) held to the training contract too:
    where the seam and its own weight read clean, the first term off names the cause (its weight in the report)."""
    if result.diagnosis.drift:
        return result
    for weight in weights:
        if weight.off:
            report = dataclasses.replace(result.report, step_weight=weight)
            return CheckResult(report, diagnose(report, group_sizes=group_sizes, thresholds=thresholds or Thresholds()),
                               result.sampled_tokens)
    return result


def _half_precision(hidden: torch.Tensor) -> bool:
    """16-bit inputs are always fitted: there a narrow softmax's per-token rounding is near the native path's, cancels
    in the mean loss and hides in the gradients' norm budget, and only the fit's per-token spread shows it. The
    dtype is the same on every rank of the TP group, so all fit or none."""
    return hidden.dtype in (torch.bfloat16, torch.float16)


def _over_budget_anywhere(report: ParityReport, contract: CEContract, device: torch.device) -> bool:
    """Whether any rank of the TP group is over budget: the signature fit is a TP collective, so all fit or none.

    Clean checks of fp32 inputs stop here and pay for no fit.
    """
    flag = torch.tensor([float(not report.within_budget)], device=device)
    return bool(_dist.all_reduce(flag, dist.ReduceOp.MAX, contract.tp_group).item())


def _sample_rows(record: SeamRecord, contract: CEContract, sample_tokens: int | None) -> torch.Tensor | None:
    n = record.targets.numel()
    if sample_tokens is None or sample_tokens >= n:
        return None
    if contract.sequence_parallel or contract.reduction == "none":
        raise ValueError("token sampling needs the whole sequence on this rank and a scalar loss; it does not"
                         f" apply to layout {contract.layout} or reduction={contract.reduction!r}. Set sample_tokens=None.")
    if contract.z_loss_positions == "all" and contract.z_loss:
        raise ValueError("token sampling runs the sampled rows as per-token losses, which carry no z-loss over all"
                         " positions (ignored rows' z-loss gradient included); it does not apply to"
                         " z_loss_positions='all'. Set sample_tokens=None.")
    return torch.linspace(0, n - 1, sample_tokens, device=record.targets.device).long()


def _sampled_reference(record: SeamRecord, contract: CEContract, rows: torch.Tensor,
                       chunk_elements: int) -> ReferenceResult:
    """Loss and counts over every token (statistics pass only), dL/dh on the sampled rows.

    The sampled rows are run as per-token losses whose upstream gradient carries the full batch's divisor,
    so their dL/dh rows are exactly the full batch's rows.
    """
    full = reference_linear_cross_entropy(record.hidden, record.weight, record.targets, contract,
                                          grad_output=None, chunk_elements=chunk_elements,
                                          given_count=record.given_count)
    hidden = record.hidden.reshape(-1, record.hidden.shape[-1])[rows]    # (n_sample, D)
    targets = record.targets.reshape(-1)[rows]                           # (n_sample,)
    per_token = dataclasses.replace(contract, reduction="none", normalize_by="local_tokens", token_group=None,
                                    z_loss_positions="counted")  # 'all' has no z-loss here: _sample_rows refused it
    upstream = float(record.upstream) / full.divisor if contract.reduction == "mean" and full.divisor > 0 else (
        0.0 if contract.reduction == "mean" else float(record.upstream))
    sampled = reference_linear_cross_entropy(hidden, record.weight, targets, per_token,
                                             grad_output=upstream, chunk_elements=chunk_elements)
    return dataclasses.replace(full, per_token_loss=sampled.per_token_loss, lse=sampled.lse,
                               mean_logit=sampled.mean_logit, mean_logit_local=sampled.mean_logit_local,
                               targets=sampled.targets, grad_hidden=sampled.grad_hidden, grad_weight=None,
                               token_weight=sampled.token_weight)
