"""Compare what a fused path produced with the reference, against an error budget earned by the native path.

A fixed tolerance either cries wolf on bf16 or waves through an fp32 bug. The budget here is what a
plain ``F.linear`` in the input dtype followed by an fp32 cross-entropy gets wrong *on the same inputs*
(measured on a token sample), times a safety factor: bf16 runs are judged by bf16 rounding, fp32 runs
strictly.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ce_guard import _dist
from ce_guard.contract import CEContract
from ce_guard._compile import compiled_on_cuda
from ce_guard.reference import ReferenceResult, count_nonfinite
from ce_guard.signature import SignatureFit

# Relative-error floors per input dtype, (loss, gradients): reduction order alone moves results this much.
# A mean loss averages rounding over tokens, so its floor sits ten times under the gradients'.
_FLOORS = {torch.float64: (1e-11, 1e-10), torch.float32: (2e-6, 2e-5), torch.bfloat16: (2e-4, 2e-3),
           torch.float16: (5e-5, 5e-4)}


# A correct path rounds each token's softmax no more widely than the native path (logits in the input dtype,
# softmax in fp32). Wider by SPREAD_SIGMAS standard errors, and by NARROW_SOFTMAX (fp16's unit roundoff) in rms per
# token, is a narrower dtype's rounding of the softmax's statistics: unbiased per token, so it cancels in the mean
# loss and hides in the gradients' norm budget (docs/faults.md, row 3).
SPREAD_SIGMAS = 5.0
NARROW_SOFTMAX = 2.0 ** -11

# Unit roundoff of what fp32 matmuls round to under torch.set_float32_matmul_precision: TF32, bf16.
_FP32_MATMUL_ROUNDOFF = {"highest": 0.0, "high": 2.0 ** -11, "medium": 2.0 ** -8}


def _grad_scale(dtype: torch.dtype) -> float:
    """The largest common scale rounding alone can put on a gradient computed from ``dtype`` inputs.

    Rounding every element the same way by up to half an ulp scales the whole gradient by up to the unit
    roundoff of the matmuls' precision (bf16: 2^-8 = 0.39%). It happens when one rounded factor dominates,
    e.g. the target term -1/n of dL/dz: correct bf16 paths show 0.2-0.3% on CPU. Never below the dtype's
    gradient floor.
    """
    roundoff = torch.finfo(dtype).eps / 2
    if dtype == torch.float32:
        roundoff = max(roundoff, _FP32_MATMUL_ROUNDOFF.get(torch.get_float32_matmul_precision(), 0.0))
    return max(roundoff, _FLOORS.get(dtype, _FLOORS[torch.float32])[1])


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
class ErrorBudget:
    """Largest errors a correct path may show, relative to the reference (``per_token_abs`` absolute).

    ``grad_scale`` bounds the gradients' common scale alone (norm ratio - 1): rounding biases it by at most
    one unit roundoff of the input dtype, less than the per-element budget allows.
    """

    loss_rel: float
    grad_hidden_rel: float
    grad_weight_rel: float
    per_token_abs: float
    grad_scale: float
    source: str

    @classmethod
    def for_dtype(cls, dtype: torch.dtype, *, safety: float = 4.0) -> "ErrorBudget":
        """A budget from the dtype's floor alone, for when the native path cannot be run."""
        loss_floor, grad_floor = _FLOORS.get(dtype, _FLOORS[torch.float32])
        return cls(loss_rel=safety * loss_floor, grad_hidden_rel=safety * grad_floor,
                   grad_weight_rel=safety * grad_floor, per_token_abs=safety * grad_floor,
                   grad_scale=_grad_scale(dtype),
                   source=f"{safety:g} x the {dtype} floors ({loss_floor:g} loss, {grad_floor:g} gradients)")


def native_error_budget(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    contract: CEContract,
    *,
    sample_tokens: int = 128,
    safety: float = 4.0,
) -> ErrorBudget:
    """Measure the native path's error on a token sample and turn it into a budget.

    The native path is PyTorch's own: ``F.linear`` in the input dtype, then ``F.cross_entropy`` in fp32,
    autograd for the gradients (which come back in the input dtype). It is judged against the same math
    in float64 on this rank's vocab slice; the rounding it shows is the rounding a fused path may show.
    Each budget entry is ``safety * native_error + floor(dtype)``, with a lower floor for the loss.
    """
    h = hidden.reshape(-1, hidden.shape[-1])
    y = targets.reshape(-1) - contract.vocab_start
    inside = (targets.reshape(-1) != contract.ignore_index) & (y >= 0) & (y < contract.vocab_slice_size)
    rows = inside.nonzero().squeeze(1)
    loss_floor, grad_floor = _FLOORS.get(hidden.dtype, _FLOORS[torch.float32])
    if rows.numel() == 0:
        return ErrorBudget.for_dtype(hidden.dtype, safety=safety)
    rows = rows[torch.linspace(0, rows.numel() - 1, min(sample_tokens, rows.numel())).long()]
    h_s, y_s = h[rows].detach(), y[rows]

    def run(dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        h_in = h_s.to(dtype).detach().requires_grad_()
        w_in = weight.detach().to(dtype).requires_grad_()
        z = F.linear(h_in, w_in).float() if dtype != torch.float64 else F.linear(h_in, w_in)
        if contract.softcap is not None:
            z = contract.softcap * torch.tanh(z / contract.softcap)
        per_token = F.cross_entropy(z, y_s, reduction="none", label_smoothing=contract.label_smoothing)
        per_token = per_token + contract.z_loss * torch.logsumexp(z, dim=1).square()
        per_token.mean().backward()
        return per_token.detach().double(), h_in.grad.double(), w_in.grad.double()

    native, exact = run(hidden.dtype), run(torch.float64)
    loss_rel = _expected_mean_error(native[0] - exact[0], n_averaged=int((targets != contract.ignore_index).sum()))
    loss_rel /= max(abs(float(exact[0].mean())), 1e-12)
    grad_hidden_rel = _rel(native[1], exact[1])
    # The sample leaves most rows of a large vocab's dW without a target (128 tokens, 262k rows), and there
    # the native rounding nearly vanishes: its dW error falls with V while a full batch's does not (the
    # bf16 margin rose from 0.36 to 0.79 between V = 32k and 262k, docs/benchmarks.md "Calibration").
    # dL/dh is dense at any V and comes from the same rounded logit gradient, so it bounds dW's from below.
    grad_weight_rel = max(_rel(native[2], exact[2]), grad_hidden_rel)
    return ErrorBudget(
        loss_rel=safety * loss_rel + loss_floor,
        grad_hidden_rel=safety * grad_hidden_rel + grad_floor,
        grad_weight_rel=safety * grad_weight_rel + grad_floor,
        per_token_abs=safety * float((native[0] - exact[0]).abs().max()) + grad_floor,
        grad_scale=_grad_scale(hidden.dtype),
        source=f"{safety:g} x native {hidden.dtype} path on {rows.numel()} tokens + floors"
               f" ({loss_floor:g} loss, {grad_floor:g} gradients)",
    )


def _expected_mean_error(token_error: torch.Tensor, *, n_averaged: int) -> float:
    """The error a correct path's mean over ``n_averaged`` tokens is expected to show, from a sample of its
    per-token errors: their spread over the averaged count, plus any bias the sample shows beyond its noise.

    Rounding to nearest is unbiased, so a correct path's per-token errors mostly cancel in the mean. The
    sample's own mean is not the estimate: on 256 tokens its noise (spread / 16) is what varies a budget
    25x from check to check while the full batch's mean error is spread / sqrt(n). Only the part of it
    beyond three standard errors is kept as a bias the fused path may share.
    """
    m = token_error.numel()
    spread = float(token_error.std(unbiased=False))
    bias = max(abs(float(token_error.mean())) - 3 * spread / math.sqrt(m), 0.0)
    return math.sqrt(bias ** 2 + spread ** 2 / max(n_averaged, 1))


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
    within_budget: bool
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
    grad_hidden_ignored_norm: float | None      # fused dL/dh on ignored tokens (must be 0)
    grad_hidden_boundary_share: float | None    # share of dL/dh error on tokens whose target sits on a slice edge
    boundary_token_fraction: float
    grad_weight_edge_row_share: float | None    # share of dL/dW error on the first/last row of this slice
    fused_loss_tp_spread: float                 # max - min of the fused loss over the TP group (0 if TP=1)
    mean_lse_sq: float                          # z-loss evidence: mean over visible tokens of lse^2
    smoothing_local_offset: float               # loss offset if smoothing used this slice's V
    contract: dict[str, Any] = field(default_factory=dict)
    signature: SignatureFit | None = None       # dL/dh error on the faults' directions, fitted when over budget

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def compare(
    fused: SeamOutputs,
    reference: ReferenceResult,
    contract: CEContract,
    *,
    budget: ErrorBudget | None = None,
) -> ParityReport:
    """Compare a fused result with the reference on the same inputs.

    Every rank of the TP group must call this together: the fused loss is gathered over the group to
    measure how much it differs between ranks (it must not).

    Args:
        fused: what the fused path produced.
        reference: :func:`reference_linear_cross_entropy` on the same inputs and contract.
        contract: the contract both were held to.
        budget: allowed errors; defaults to :meth:`ErrorBudget.for_dtype` of the fused gradient's dtype.
    """
    dtype = fused.grad_hidden.dtype if fused.grad_hidden is not None else fused.loss.dtype
    budget = budget or ErrorBudget.for_dtype(dtype)
    visible = reference.targets != contract.ignore_index

    loss_f, loss_r = _scalar_loss(fused.loss, visible), _scalar_loss(reference.loss, visible)
    per_token_diff = None
    if contract.reduction == "none" and fused.loss.numel() == reference.loss.numel():
        per_token_diff = _max_abs(fused.loss.detach().double() - reference.loss.double())
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
    within = (not any(nonfinite.values()) and loss_rel <= budget.loss_rel
              and (per_token_diff is None or per_token_diff <= budget.per_token_abs)
              and (gh["rel_err"] is None or gh["rel_err"] <= budget.grad_hidden_rel)
              and (gw["rel_err"] is None or gw["rel_err"] <= budget.grad_weight_rel))

    boundary = _boundary_tokens(reference.targets, contract) & visible
    vis_f = visible.double()
    return ParityReport(
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
        budget=budget, within_budget=within, nonfinite=nonfinite,
        n_tokens=reference.n_tokens, n_visible=reference.n_visible,
        n_visible_shard=reference.n_visible_shard, n_visible_global=reference.n_visible_global,
        divisor=reference.divisor, token_group_size=reference.token_group_size, tp_size=reference.tp_size,
        grad_hidden_ignored_norm=_masked_norm(gh["row_fused_sq"], ~visible),
        grad_hidden_boundary_share=_error_share(gh["row_error_sq"], boundary),
        boundary_token_fraction=float(boundary.double().mean()) if boundary.numel() else 0.0,
        grad_weight_edge_row_share=_edge_row_share(gw["row_error_sq"]),
        fused_loss_tp_spread=_tp_spread(loss_f, contract, fused.loss.device),
        mean_lse_sq=_masked_mean(reference.lse.double().square(), vis_f),
        smoothing_local_offset=contract.label_smoothing * _masked_mean(
            (reference.mean_logit - reference.mean_logit_local).double(), vis_f),
        contract=contract.to_dict(),
    )


def margins(report: ParityReport) -> dict[str, float | None]:
    """Error / budget per compared quantity: 1 is the line a correct path stays under; None where not measured."""
    b = report.budget

    def ratio(err: float | None, budget: float) -> float | None:
        return None if err is None else (err / budget if budget > 0 else math.inf)

    return {"loss": ratio(report.loss_rel_err, b.loss_rel),
            "grad_hidden": ratio(report.grad_hidden_rel_err, b.grad_hidden_rel),
            "grad_weight": ratio(report.grad_weight_rel_err, b.grad_weight_rel),
            "softmax": softmax_margin(report.signature)}


def softmax_margin(fit: SignatureFit | None) -> float | None:
    """How far each token's softmax factor spreads beyond the native path's, against the line a correct path stays
    under: the lesser of its standard errors over ``SPREAD_SIGMAS`` and its rms excess over ``NARROW_SOFTMAX`` (above
    1 only when both are). None where no signature was fitted."""
    if fit is None:
        return None
    return min(max(fit.spread_sigmas(), 0.0) / SPREAD_SIGMAS, fit.softmax_excess / NARROW_SOFTMAX)


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


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    denom = float(b.norm())
    return float((a - b).norm()) / denom if denom > 0 else 0.0
