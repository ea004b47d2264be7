"""Evidence and readings shared by the rules: the core evidence every diagnosis carries, the headline of errors
against budgets, the fit's evidence, and the margins under the names the summaries use."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING

from ce_guard.diagnosis.verdict import error_margins

if TYPE_CHECKING:
    from ce_guard.parity import ParityReport
    from ce_guard.signature import SignatureFit

# The ParityReport fields every diagnosis reports (core_evidence) besides the signals its rule decides on.
CORE_FIELDS = ("loss_fused", "loss_ref", "loss_rel_err", "n_visible", "n_visible_global", "divisor",
               "grad_hidden_norm_ratio", "grad_hidden_cosine", "grad_hidden_rel_err", "grad_weight_rel_err")


def core_evidence(r: ParityReport) -> dict[str, float | int]:
    evidence = {"loss_fused": r.loss_fused, "loss_ref": r.loss_ref, "loss_rel_err": r.loss_rel_err,
                "n_visible": r.n_visible, "n_visible_global": r.n_visible_global, "divisor": r.divisor}
    for key in ("grad_hidden_norm_ratio", "grad_hidden_cosine", "grad_hidden_rel_err", "grad_weight_rel_err"):
        value = getattr(r, key)
        if value is not None:
            evidence[key] = value
    return evidence


def headline(r: ParityReport) -> str:
    """The errors against their budgets, in one line."""
    parts = [f"loss rel err {r.loss_rel_err:.3g} (budget {r.budget.loss_rel:.3g})"]
    if r.grad_hidden_rel_err is not None:
        parts.append(f"dL/dh rel err {r.grad_hidden_rel_err:.3g} (budget {r.budget.grad_hidden_rel:.3g},"
                     f" norm ratio {r.grad_hidden_norm_ratio:.4f})")
    if r.grad_weight_rel_err is not None:
        parts.append(f"dL/dW rel err {r.grad_weight_rel_err:.3g} (budget {r.budget.grad_weight_rel:.3g})")
    return ", ".join(parts)


def fit_evidence(fit: SignatureFit) -> dict[str, float | int]:
    return {"fit_tokens": fit.tokens, "fit_scale": fit.scale, "fit_scale_se": fit.scale_se,
            "fit_target": fit.target, "fit_target_se": fit.target_se, "fit_shift": fit.shift,
            "fit_shift_se": fit.shift_se, "fit_residual_rel": fit.residual_rel,
            "fit_softmax_spread": fit.softmax_spread, "fit_softmax_spread_se": fit.softmax_spread_se,
            "fit_softmax_excess": fit.softmax_excess,
            **({} if fit.pure_scale is None else {"fit_pure_scale": fit.pure_scale, "fit_pure_target": fit.pure_target,
                                                  "fit_pure_shift": fit.pure_shift})}


def excess(r: ParityReport) -> dict[str, float]:
    """Error / budget of loss, dL/dh and dL/dW (the logged margins); 0 for a gradient not compared."""
    m = error_margins(r)
    return {"loss": m["loss"], "dL/dh": m["grad_hidden"] or 0.0, "dL/dW": m["grad_weight"] or 0.0}


def loss_factor(r: ParityReport) -> float | None:
    """``loss_ratio - 1`` when the loss is over its budget and the ratio is defined; else None."""
    if r.loss_rel_err <= r.budget.loss_rel or r.loss_ref == 0 or not math.isfinite(r.loss_ratio):
        return None
    return r.loss_ratio - 1.0


def z_loss_over_all_positions(r: ParityReport) -> bool:
    """Whether the contract adds a z-loss over every row (``z_loss_positions='all'``): the reference then has a
    loss and a dL/dh on ignored rows too. Records from before the field read as per-token z-loss."""
    return r.contract.get("z_loss_positions") == "all" and bool(r.contract.get("z_loss"))


def groups_of_size(k: int, sizes: Mapping[str, int]) -> str:
    return " = ".join(name for name, size in sizes.items() if size == k)


def close(a: float, b: float, rel: float) -> bool:
    return math.isfinite(a) and math.isfinite(b) and abs(a - b) <= rel * max(abs(b), 1e-12)
