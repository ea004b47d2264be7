"""Compare what a fused path produced with the reference: every number a verdict and a diagnosis read.

The budget the errors are held to is earned by the native path (``ce_guard.budget``); the verdict is
decided from the margins in one place (``ce_guard.diagnosis.verdict``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from ce_guard import _dist
from ce_guard._compile import compiled_on_cuda
from ce_guard.budget import ErrorBudget
from ce_guard.contract import CEContract
from ce_guard.diagnosis.verdict import judged
from ce_guard.reference import ReferenceResult, count_nonfinite
from ce_guard.signature import SignatureFit
from ce_guard.step_weight import StepWeight
from ce_guard.transform_fit import TransformFit
from ce_guard.upstream_fit import UpstreamFit, fit_upstream


@dataclass(frozen=True)
class SeamOutputs:
    """What a fused output layer produced on the recorded inputs.

    ``loss`` is the value training optimised (scalar, or per-token for ``reduction='none'``);
    ``grad_hidden`` is dL/dhidden as the real backward produced it; ``grad_weight`` is dL/dW for this
    rank's slice when available (e.g. from a standalone replay).
    """

    loss: torch.Tensor
    grad_hidden: torch.Tensor | None = None
    grad_weight: torch.Tensor | None = None


@dataclass(frozen=True)
class ParityReport:
    """Every number a diagnosis or a person needs to judge one check. Plain floats: JSON-ready."""

    loss_fused: float
    loss_ref: float
    loss_abs_err: float
    loss_rel_err: float
    loss_ratio: float
    loss_offset_per_token: float  # (fused - ref) in units of one visible token's loss
    per_token_max_abs_diff: float | None
    grad_hidden_norm_fused: float | None
    grad_hidden_norm_ref: float | None
    grad_hidden_norm_ratio: float | None
    grad_hidden_cosine: float | None
    grad_hidden_max_abs_diff: float | None
    grad_hidden_rel_err: float | None
    grad_hidden_scaled_residual: float | None  # what a single scale factor leaves unexplained, relative
    grad_hidden_shift_share: float | None   # share of the dL/dh error in one vector common to all visible tokens
    grad_hidden_magnitude_coupling: float | None  # how much the dL/dh error grows with each element's size (1: not)
    grad_hidden_tp_sum_rel_err: float | None  # the TP group's fused dL/dh summed, against the reference
    grad_weight_norm_fused: float | None
    grad_weight_norm_ref: float | None
    grad_weight_norm_ratio: float | None
    grad_weight_cosine: float | None
    grad_weight_max_abs_diff: float | None
    grad_weight_rel_err: float | None
    grad_weight_scaled_residual: float | None  # as for dL/dh
    grad_weight_shift_share: float | None   # share of the dL/dW error in one vector common to all rows of the slice
    budget: ErrorBudget
    within_budget: bool  # the verdict, set by ce_guard.diagnosis.verdict.judged from the margins
    nonfinite: dict[str, int]
    # counts that own the divide
    n_tokens: int
    n_visible: int
    n_visible_shard: int
    n_visible_global: int
    divisor: float
    token_group_size: int
    tp_size: int
    # evidence for the diagnosis
    grad_hidden_ignored_norm: float | None      # dL/dh error on ignored tokens: the fused dL/dh there, which must
    #                                             be 0, unless a z-loss over all positions gives them a gradient
    grad_hidden_boundary_share: float | None    # share of dL/dh error on tokens whose target sits on a slice edge
    boundary_token_fraction: float
    grad_weight_edge_row_share: float | None    # share of dL/dW error on the first/last row of this slice
    fused_loss_tp_spread: float                 # max - min of the fused loss over the TP group (0 if TP=1)
    mean_lse_sq: float                          # z-loss evidence: mean of lse^2 over the rows the z-loss covers
    #                                             (visible tokens; every row under z_loss_positions='all')
    smoothing_local_offset: float               # loss offset if smoothing used this slice's V
    contract: dict[str, Any] = field(default_factory=dict)
    signature: SignatureFit | None = None       # dL/dh error on the faults' directions, fitted when over budget
    output_transform: TransformFit | None = None  # the contract's transform mistaken so as to match, when over budget
    upstream_fit: UpstreamFit | None = None     # the per-token upstream weights dL/dh carries (reduction='none', per-token
    #                                             upstream, dL/dh over budget)
    step_weight: StepWeight | None = None       # the micro-batch's weight in the step, against the training contract
    mutated_inputs: tuple[str, ...] = ()        # inputs the loss path wrote into (their checksums changed)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def compare(
    fused: SeamOutputs,
    reference: ReferenceResult,
    contract: CEContract,
    *,
    budget: ErrorBudget | None = None,
    upstream: torch.Tensor | float | None = None,
) -> ParityReport:
    """Compare a fused result with the reference on the same inputs.

    Every rank of the TP group must call this together: the fused loss is gathered over the group to
    measure how much it differs between ranks (it must not). ``within_budget`` is the verdict on these numbers;
    :func:`ce_guard.check_seam` adds the signature fit and decides again, with the softmax's margin.

    Args:
        fused: what the fused path produced.
        reference: :func:`reference_linear_cross_entropy` on the same inputs and contract.
        contract: the contract both were held to.
        budget: allowed errors; defaults to :meth:`ErrorBudget.for_dtype` of the fused gradient's dtype.
        upstream: the upstream gradient training's backward delivered (the reference's ``grad_output``). A
            per-token one (``reduction='none'``) is fitted, when dL/dh is over budget, for the weight each token's
            dL/dh carries (:func:`ce_guard.upstream_fit.fit_upstream`).
    """
    dtype = fused.grad_hidden.dtype if fused.grad_hidden is not None else fused.loss.dtype
    budget = budget or ErrorBudget.for_dtype(dtype)
    visible = reference.targets != contract.ignore_index

    loss_f, loss_r = _scalar_loss(fused.loss, visible), _scalar_loss(reference.loss, visible)
    per_token_diff = None
    if contract.reduction == "none" and fused.loss.numel() == reference.loss.numel():
        # flat: a per-token loss may come as (N,) where the reference's has the targets' shape (``F.cross_entropy``
        # on ``logits.view(-1, V)``)
        per_token_diff = _max_abs(fused.loss.detach().reshape(-1).double() - reference.loss.reshape(-1).double())
    offset_scale = reference.divisor / max(reference.n_visible, 1) if contract.reduction == "mean" else (
        1.0 / max(reference.n_visible, 1) if contract.reduction == "sum" else 1.0)

    gh = _grad_stats(fused.grad_hidden, reference.grad_hidden, common_rows=visible)
    gw = _grad_stats(fused.grad_weight, reference.grad_weight)
    nonfinite = {**{f"input_{k}": v for k, v in reference.nonfinite_inputs.items()},
                 "fused_loss": count_nonfinite(fused.loss),
                 "fused_grad_hidden": count_nonfinite(fused.grad_hidden, _STAT_BLOCK_ELEMENTS),
                 "fused_grad_weight": count_nonfinite(fused.grad_weight, _STAT_BLOCK_ELEMENTS),
                 "reference_loss": count_nonfinite(reference.loss)}

    loss_rel = abs(loss_f - loss_r) / max(abs(loss_r), 1e-12)

    boundary = _boundary_tokens(reference.targets, contract) & visible
    vis_f = visible.double()
    report = ParityReport(
        loss_fused=loss_f, loss_ref=loss_r, loss_abs_err=abs(loss_f - loss_r), loss_rel_err=loss_rel,
        loss_ratio=loss_f / loss_r if loss_r != 0 else math.nan,
        loss_offset_per_token=(loss_f - loss_r) * offset_scale,
        per_token_max_abs_diff=per_token_diff,
        grad_hidden_norm_fused=gh["norm_fused"], grad_hidden_norm_ref=gh["norm_ref"],
        grad_hidden_norm_ratio=gh["ratio"], grad_hidden_cosine=gh["cosine"],
        grad_hidden_max_abs_diff=gh["max_abs"], grad_hidden_rel_err=gh["rel_err"],
        grad_hidden_scaled_residual=gh["scaled_residual"],
        grad_hidden_shift_share=gh["shift_share"],
        grad_hidden_magnitude_coupling=gh["magnitude_coupling"],
        grad_hidden_tp_sum_rel_err=_tp_sum_rel_err(fused.grad_hidden, reference.grad_hidden, contract,
                                                   over_budget=(gh["rel_err"] or 0.0) > budget.grad_hidden_rel),
        grad_weight_norm_fused=gw["norm_fused"], grad_weight_norm_ref=gw["norm_ref"],
        grad_weight_norm_ratio=gw["ratio"], grad_weight_cosine=gw["cosine"],
        grad_weight_max_abs_diff=gw["max_abs"], grad_weight_rel_err=gw["rel_err"],
        grad_weight_scaled_residual=gw["scaled_residual"],
        grad_weight_shift_share=gw["shift_share"],
        budget=budget, within_budget=False, nonfinite=nonfinite,  # decided below, from these numbers
        n_tokens=reference.n_tokens, n_visible=reference.n_visible,
        n_visible_shard=reference.n_visible_shard, n_visible_global=reference.n_visible_global,
        divisor=reference.divisor, token_group_size=reference.token_group_size, tp_size=reference.tp_size,
        grad_hidden_ignored_norm=_masked_norm(gh["row_error_sq"], ~visible),  # the reference's is 0 but for 'all' z-loss
        grad_hidden_boundary_share=_error_share(gh["row_error_sq"], boundary),
        boundary_token_fraction=float(boundary.double().mean()) if boundary.numel() else 0.0,
        grad_weight_edge_row_share=_edge_row_share(gw["row_error_sq"]),
        fused_loss_tp_spread=_tp_spread(loss_f, contract, fused.loss.device),
        mean_lse_sq=_masked_mean(reference.lse.double().square(),
                                 vis_f if contract.z_loss_positions == "counted" else torch.ones_like(vis_f)),
        smoothing_local_offset=contract.label_smoothing * _masked_mean(
            (reference.mean_logit - reference.mean_logit_local).double(), vis_f),
        contract=contract.to_dict(),
        upstream_fit=_upstream_fit(fused, reference, contract, upstream,
                                   over_budget=(gh["rel_err"] or 0.0) > budget.grad_hidden_rel),
    )
    return judged(report)


def _upstream_fit(fused: SeamOutputs, reference: ReferenceResult, contract: CEContract,
                  upstream: torch.Tensor | float | None, *, over_budget: bool) -> UpstreamFit | None:
    """The per-token upstream fit, only where it can say something: per-token losses under a per-token upstream,
    and dL/dh over budget (a clean check pays nothing)."""
    if not over_budget or contract.reduction != "none" or not torch.is_tensor(upstream) or upstream.numel() < 2:
        return None
    tokens_shape = reference.grad_hidden.shape[:-1] if reference.grad_hidden is not None else torch.Size()
    return fit_upstream(fused.grad_hidden, reference.grad_hidden, reference.token_weight, upstream, tokens_shape)


def _scalar_loss(loss: torch.Tensor, visible: torch.Tensor) -> float:
    """A scalar to compare: the loss itself, or for per-token losses their mean over visible tokens."""
    loss = loss.detach().double()
    if loss.numel() == 1:
        return float(loss.reshape(()))
    return _masked_mean(loss.reshape(-1), visible.double()) if loss.numel() == visible.numel() else float(loss.mean())


_STAT_BLOCK_ELEMENTS = 1 << 24  # one float64 block of 128 MiB: a 152k x 4096 dW is never copied whole


def _grad_stats(fused: torch.Tensor | None, ref: torch.Tensor | None,
                common_rows: torch.Tensor | None = None) -> dict[str, Any]:
    """Norms, cosine, errors and per-row error energy of a gradient against the reference, in float64.

    Read a block of rows at a time: a float64 copy of a whole dL/dW (5 GB at V = 152k, D = 4096) would put
    the check itself on the training job's memory peak. ``common_rows`` (a mask over the rows) restricts
    the shift share to the rows that should share one (the visible tokens for dL/dh).
    """
    if fused is None or ref is None:
        return dict.fromkeys(("norm_fused", "norm_ref", "ratio", "cosine", "max_abs", "rel_err", "scaled_residual",
                              "shift_share", "magnitude_coupling", "row_error_sq", "row_fused_sq"))
    if fused.shape != ref.shape:
        raise ValueError(f"fused gradient shape {tuple(fused.shape)} does not match the reference's"
                         f" {tuple(ref.shape)}; was the gradient recorded on another rank's shard?")
    f_rows, r_rows = fused.detach().reshape(-1, fused.shape[-1]), ref.detach().reshape(-1, ref.shape[-1])
    device = f_rows.device
    common = (torch.ones(f_rows.shape[0], dtype=torch.bool, device=device) if common_rows is None
              else common_rows.reshape(-1))
    step = max(1, _STAT_BLOCK_ELEMENTS // max(f_rows.shape[1], 1))
    blocks = [slice(start, start + step) for start in range(0, f_rows.shape[0], step)]
    block_error_stats = compiled_on_cuda(_block_error_stats, device)
    block_residual_sq = compiled_on_cuda(_block_residual_sq, device)
    row_error_sq = torch.zeros(f_rows.shape[0], dtype=torch.float64, device=device)
    row_fused_sq = torch.zeros_like(row_error_sq)
    error_sum = torch.zeros(f_rows.shape[1], dtype=torch.float64, device=device)  # over common rows
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # sum r^2, <f, r>, sum e^2 r^2, max |e|
    for rows in blocks:
        row_error_sq[rows], row_fused_sq[rows], block_error_sum, block_totals = block_error_stats(
            f_rows[rows], r_rows[rows], common[rows])
        error_sum += block_error_sum
        totals[:3] += block_totals[:3]
        totals[3] = torch.maximum(totals[3], block_totals[3])
    ref_sq, dot = totals[0], totals[1]
    # |f - s r| / |r| at the least-squares s = <f, r> / <r, r>: zero for a pure scale, whatever s is. A second
    # pass, since |f|^2 - <f, r>^2 / |r|^2 cancels to nothing for the tiny residuals of a clean fp64 check.
    scale = torch.where(ref_sq > 0, dot / ref_sq, 0.0)
    residual_sq = sum((block_residual_sq(f_rows[rows], r_rows[rows], scale) for rows in blocks),
                      totals.new_zeros(()))
    # Every scalar leaves the device at once: the host waits for the device once per gradient, not per block.
    (fused_sq, ref_sq, dot, coupled_sq, max_abs, residual_sq, error_sq, common_error_sq, n_common,
     common_shift_sq) = torch.stack([row_fused_sq.sum(), *totals, residual_sq, row_error_sq.sum(),
                                     (row_error_sq * common).sum(), common.sum().double(),
                                     error_sum.square().sum()]).tolist()
    n_common = int(n_common)
    norm_f, norm_r = math.sqrt(fused_sq), math.sqrt(ref_sq)
    # Mean r^2 over the common rows' elements: rows that should be zero (ignored tokens) must not dilute it.
    mean_ref_sq = ref_sq / (n_common * f_rows.shape[1]) if n_common and f_rows.shape[1] else 0.0
    return {
        "norm_fused": norm_f,
        "norm_ref": norm_r,
        "ratio": norm_f / norm_r if norm_r > 0 else (1.0 if norm_f == 0 else math.inf),
        "cosine": dot / (norm_f * norm_r) if norm_f > 0 and norm_r > 0 else (1.0 if norm_f == norm_r else 0.0),
        "max_abs": max_abs,
        "rel_err": math.sqrt(error_sq) / norm_r if norm_r > 0 else (0.0 if error_sq == 0 else math.inf),
        "scaled_residual": math.sqrt(residual_sq) / norm_r if norm_r > 0 else None,
        # Share of the error's energy in its mean row, rows * |mean row|^2 / |error|^2: 1 when the error is one
        # vector added to every row, as a constant shift of dL/dz over a vocab slice leaves in dL/dW (and, with
        # equal token weights, in dL/dh); rounding has no common row, about 1/rows.
        "shift_share": (common_shift_sq / n_common / common_error_sq
                        if common_error_sq > 0 and n_common else 0.0),
        # sum(e^2 r^2) / (sum(e^2) mean(r^2)): 1 when the error ignores each element's size (terms skipped, as a
        # gradient filter does), about E[r^4] / E[r^2]^2 (3 for Gaussian r) when it is a relative rounding of the
        # element itself, as a running sum kept in a narrow dtype leaves.
        "magnitude_coupling": (coupled_sq / error_sq / mean_ref_sq
                               if error_sq > 0 and mean_ref_sq > 0 else None),
        "row_error_sq": row_error_sq,  # (rows,) error energy per token (dL/dh) or vocab row (dL/dW)
        "row_fused_sq": row_fused_sq,  # (rows,)
    }


def _block_error_stats(f: torch.Tensor, r: torch.Tensor, common: torch.Tensor):
    """One block of rows in float64: per row |e|^2 and |f|^2, the column sums of e over the common rows, and
    the block's sum r^2, <f, r>, sum e^2 r^2 and max |e| (e = f - r)."""
    f, r = f.double(), r.double()
    error = f - r
    totals = torch.stack([r.square().sum(), (f * r).sum(), (error * r).square().sum(),
                          error.abs().amax() if error.numel() else error.new_zeros(())])
    return error.square().sum(dim=1), f.square().sum(dim=1), (error * common[:, None]).sum(dim=0), totals


def _block_residual_sq(f: torch.Tensor, r: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (f.double() - scale * r.double()).square().sum()


def _boundary_tokens(targets: torch.Tensor, contract: CEContract) -> torch.Tensor:
    """Tokens whose target id is where this rank's slice meets a neighbour's (0 and V are no seams)."""
    edges = [e for e in (contract.vocab_start, contract.vocab_end) if 0 < e < contract.vocab_size]
    mask = torch.zeros_like(targets, dtype=torch.bool)
    for e in edges:
        mask |= (targets == e) | (targets == e - 1)
    return mask


def _masked_norm(row_sq: torch.Tensor | None, mask: torch.Tensor) -> float | None:
    return None if row_sq is None else math.sqrt(float(row_sq[mask.reshape(-1)].sum()))


def _error_share(row_error_sq: torch.Tensor | None, mask: torch.Tensor) -> float | None:
    if row_error_sq is None:
        return None
    total = float(row_error_sq.sum())
    return float(row_error_sq[mask.reshape(-1)].sum()) / total if total > 0 else 0.0


def _edge_row_share(row_error_sq: torch.Tensor | None) -> float | None:
    """Share of the dL/dW error on the first and last row of this slice (where partition bugs land)."""
    if row_error_sq is None or row_error_sq.numel() < 3:
        return None
    total = float(row_error_sq.sum())
    return float(row_error_sq[0] + row_error_sq[-1]) / total if total > 0 else 0.0


def _tp_spread(loss: float, contract: CEContract, device: torch.device) -> float:
    if _dist.group_size(contract.tp_group) == 1:
        return 0.0
    gathered = _dist.all_gather_dim0(torch.tensor([loss], dtype=torch.float64, device=device), contract.tp_group)
    return float(gathered.max() - gathered.min())


def _tp_sum_rel_err(fused: torch.Tensor | None, ref: torch.Tensor | None, contract: CEContract, *,
                    over_budget: bool) -> float | None:
    """Relative error of the TP group's fused dL/dh *summed* against the reference: near zero when each rank
    returned only its vocab slice's partial sum (the copy-to-TP-region all-reduce missing).

    Only where hidden is replicated over TP (not the SP layout, whose shards sum to nothing meaningful), and
    only when some rank's dL/dh is over budget: one scalar all-reduce decides, so clean checks move no
    gradient between ranks and every rank of the group takes the same branch.
    """
    if fused is None or ref is None or contract.sequence_parallel or _dist.group_size(contract.tp_group) == 1:
        return None
    flag = torch.tensor([float(over_budget)], device=fused.device)
    if not float(_dist.all_reduce(flag, dist.ReduceOp.MAX, contract.tp_group)):
        return None
    summed = _dist.all_reduce(fused.detach().float().clone(), dist.ReduceOp.SUM, contract.tp_group)
    return _grad_stats(summed, ref)["rel_err"]


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> float:
    count = float(mask.sum())
    return float((values * mask).sum()) / count if count > 0 else 0.0


def _max_abs(t: torch.Tensor) -> float:
    return float(t.abs().max()) if t.numel() else 0.0

