"""Each row's weight in the reference's loss, as the contract states it: the count a mean divides by, the upstream
gradient per token, the z-loss's weight per row (per counted token, or spread over every row), and the L2-warp
penalty's."""

from __future__ import annotations

import torch

from ce_guard import _dist
from ce_guard.contract import CEContract


def divisor(contract: CEContract, n_visible: int, n_visible_global: int, token_group_size: int,
            given_count: float | None) -> float:
    """The count that owns a mean's divide: 1.0 for ``sum`` and ``none``."""
    if contract.reduction != "mean":
        return 1.0
    if contract.normalize_by == "given_count":  # handed in by the caller; validated finite and > 0
        return float(given_count)
    if contract.normalize_by == "local_tokens":
        return float(n_visible)
    if contract.grad_sync == "average":  # the strategy averages gradients, so undo its 1/|group|
        return n_visible_global / token_group_size
    return float(n_visible_global)


def upstream_per_token(grad_output, contract: CEContract, visible: torch.Tensor, divisor: float, tp,
                       device: torch.device) -> torch.Tensor:
    """dLoss/dper_token_loss for every token in the reference's view: (N,) fp32, 0 where ignored."""
    if contract.reduction == "none":
        g = torch.as_tensor(grad_output, dtype=torch.float32, device=device).reshape(-1)
        if g.numel() == 1:  # one upstream value for every token, as for loss.sum()
            g = g.expand(visible.numel() // _dist.group_size(tp) if contract.sequence_parallel else visible.numel())
        if contract.sequence_parallel:
            g = _dist.all_gather_dim0(g, tp)
        if g.numel() != visible.numel():
            raise ValueError(f"`grad_output` for reduction='none' must have one value per token"
                             f" ({visible.numel()}), got {g.numel()}.")
    else:
        g = torch.full(visible.shape, float(grad_output), dtype=torch.float32, device=device)
        if contract.reduction == "mean":
            g = g / divisor if divisor > 0 else g * 0.0
    return torch.where(visible, g, torch.zeros_like(g))


def z_loss_per_row(grad_output, contract: CEContract, token_weight: torch.Tensor) -> torch.Tensor:
    """dLoss/d(lse_t^2) per row (N,) fp32: the z-loss coefficient times each row's weight in it.

    ``counted``: the token's own weight in the reduction (0 where ignored). ``all``: the upstream gradient over
    the number of rows, on every row, ignored ones included (``z_loss_positions='all'`` has a scalar upstream).
    """
    if contract.z_loss_positions == "counted":
        return token_weight * contract.z_loss
    rows = token_weight.numel()
    return torch.full_like(token_weight, float(grad_output) * contract.z_loss / max(rows, 1))


def l2_warp_per_row(grad_output, contract: CEContract, n_rows: int, divisor: float) -> float:
    """dLoss/d(max_v z_tv) / max_v z_tv, the same for every row: the upstream gradient times the L2-warp factor over
    the rows it averages over (every row, or the mean's divisor); a scalar upstream (reduction mean or sum)."""
    rows = n_rows if contract.l2_warp_rows == "all" else divisor
    return float(grad_output) * contract.l2_warp / rows if rows > 0 else 0.0
