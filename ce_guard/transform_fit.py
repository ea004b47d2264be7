"""Which output transform or penalty a seam applied, when the contract's does not explain it.

A head that scales or softcaps its logits can drop the transform, apply it twice or invert it (a multiply where
the config means a divide), and a fused path can lose the softcap a patch was meant to pass. None of those is a
scale of the loss or the gradients: the softmax itself changes. A z-loss can be taken over another set of rows
than the contract's (every row, ignored ones included, as transformers' Bamba does, or the counted tokens only),
which puts a gradient on ignored rows or takes it away. fla's L2-warp penalty can be averaged over the counted
tokens instead of every row (fla 0.5.0's fused path), or its gradient left unscaled by the upstream gradient (fla
0.3.0-0.5.1's ``l2_warp``: the reference's factor divided by a scalar upstream reproduces that). So the reference
runs again under each such mistake of the contract's own terms, and the first one that reproduces the seam's loss
and dL/dh within their budgets names it. Run only on checks over budget whose contract has a transform, a z-loss or an L2-warp.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from ce_guard.budget import ErrorBudget
from ce_guard.contract import CEContract
from ce_guard.reference import reference_linear_cross_entropy


@dataclass(frozen=True)
class TransformFit:
    """The transform that reproduces the seam: the mistake, the multiplier and softcap it amounts to, and how
    closely the reference under it matches (relative errors of the loss and of dL/dh)."""

    mistake: str  # "dropped", "doubled", "inverted" (the multiplier), "softcap_dropped", "z_loss_over_<rows>",
    #               "l2_warp_over_<rows>" or "l2_warp_upstream_ignored"
    logit_multiplier: float
    softcap: float | None
    z_loss_positions: str
    loss_rel_err: float
    grad_hidden_rel_err: float
    l2_warp: float = 0.0       # the candidate's L2-warp factor (the contract's over the upstream, when ignored)
    l2_warp_rows: str = "all"


def candidate_transforms(contract: CEContract,
                         upstream: torch.Tensor | float | None = None) -> list[tuple[str, dict[str, object]]]:
    """The mistakes a seam makes with the contract's own terms: (name, the contract fields it amounts to).

    The L2-warp's upstream is a candidate only with a scalar upstream other than 1 and 0 (at 1 it cannot show)."""
    m, cap = contract.logit_multiplier, contract.softcap
    candidates: list[tuple[str, dict[str, object]]] = []
    if m != 1:
        candidates += [("dropped", {"logit_multiplier": 1.0}), ("doubled", {"logit_multiplier": m * m}),
                       ("inverted", {"logit_multiplier": 1.0 / m})]
    if cap is not None:
        candidates.append(("softcap_dropped", {"softcap": None}))
    if contract.z_loss and contract.layout == "[N,V]" and contract.reduction != "none":
        other = "all" if contract.z_loss_positions == "counted" else "counted"
        candidates.append((f"z_loss_over_{other}", {"z_loss_positions": other}))
    if contract.l2_warp:  # the contract keeps it to layout [N,V] and a scalar upstream
        other = "counted" if contract.l2_warp_rows == "all" else "all"
        candidates.append((f"l2_warp_over_{other}", {"l2_warp_rows": other}))
        g = None if upstream is None else torch.as_tensor(upstream)
        if g is not None and g.numel() == 1 and float(g) not in (0.0, 1.0):
            candidates.append(("l2_warp_upstream_ignored", {"l2_warp": contract.l2_warp / float(g)}))
    return candidates


def fit_output_transform(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, contract: CEContract,
                         loss: torch.Tensor, grad_hidden: torch.Tensor | None, upstream: torch.Tensor | float,
                         budget: ErrorBudget, *, given_count: float | None = None,
                         chunk_elements: int) -> TransformFit | None:
    """The first candidate transform under which the reference matches ``loss`` and ``grad_hidden`` within
    ``budget``; None if none does. Every rank of the TP group must call this together (the reference's
    collectives), with the same contract."""
    if grad_hidden is None:
        return None
    for mistake, changes in candidate_transforms(contract, upstream):
        candidate = dataclasses.replace(contract, **changes)
        ref = reference_linear_cross_entropy(hidden, weight, targets, candidate, grad_output=upstream,
                                             chunk_elements=chunk_elements, given_count=given_count)
        loss_err = _rel(loss.reshape(-1).double(), ref.loss.reshape(-1).double())  # per-token losses may come flat
        grad_err = _rel(grad_hidden.double(), ref.grad_hidden.double())
        if loss_err <= budget.loss_rel and grad_err <= budget.grad_hidden_rel:
            return TransformFit(mistake, candidate.logit_multiplier, candidate.softcap, candidate.z_loss_positions,
                                loss_err, grad_err, candidate.l2_warp, candidate.l2_warp_rows)
    return None


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    denom = float(b.norm())
    return float((a - b).norm()) / denom if denom > 0 else float(a.norm())
