"""Rules read before any scale or offset: non-finite values, an empty check, the clean verdict, drift on the
per-token softmax alone, and padding that reaches the hidden gradient."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from ce_guard.diagnosis.causes import Diagnosis
from ce_guard.diagnosis.signals import core_evidence, fit_evidence, headline, z_loss_over_all_positions
from ce_guard.diagnosis.thresholds import Thresholds
from ce_guard.diagnosis.verdict import margins, over_budget

if TYPE_CHECKING:
    from ce_guard.parity import ParityReport


def non_finite(r: ParityReport, sizes: Mapping[str, int], t: Thresholds) -> Diagnosis | None:
    bad = {k: v for k, v in r.nonfinite.items() if v}
    if not bad:
        return None
    where = ", ".join(f"{k.replace('_', ' ')}: {v}" for k, v in bad.items())
    return Diagnosis.of("non_finite/values", True, f"non-finite values ({where}); not averaged away",
                        {f"nonfinite_{k}": v for k, v in bad.items()})


def all_ignored(r: ParityReport, sizes: Mapping[str, int], t: Thresholds) -> Diagnosis | None:
    """Every target is ignore_index, yet the fused path returned a loss or a gradient.

    Not under a z-loss over all positions: there the reference has a loss and a gradient on every row too.
    """
    if (r.n_visible_global > 0 or not (abs(r.loss_fused) > 0 or bool(r.grad_hidden_norm_fused))
            or z_loss_over_all_positions(r)):
        return None
    return Diagnosis.of("ignore_index_leak/all_ignored", True,
                        f"every target is ignore_index, yet the fused path returned loss {r.loss_fused:.6g} and"
                        f" dL/dh norm {r.grad_hidden_norm_fused or 0.0:.6g}: padding reaches the loss",
                        core_evidence(r))


def empty(r: ParityReport, sizes: Mapping[str, int], t: Thresholds) -> Diagnosis | None:
    """No visible token anywhere: nothing to compare, unless a z-loss over all positions still covers every row."""
    if r.n_visible_global > 0 or z_loss_over_all_positions(r):
        return None
    return Diagnosis.of("no_visible_tokens/empty", False, "no visible tokens in this check: nothing to compare",
                        {"n_tokens": r.n_tokens})


def clean(r: ParityReport, sizes: Mapping[str, int], t: Thresholds) -> Diagnosis | None:
    if over_budget(r, t):
        return None
    return Diagnosis.of("within_budget/clean", False, "within budget: " + headline(r), core_evidence(r))


def narrow_softmax(r: ParityReport, sizes: Mapping[str, int], t: Thresholds) -> Diagnosis | None:
    """Loss and gradients within budget, but each token's softmax off by its own factor, wider than native.

    A running max, sum-exp or lse kept in bf16 rounds each token's lse by its own amount: unbiased, so it cancels
    in the mean loss and spreads over the gradients' norm within their budget. Only the per-token spread shows it.
    """
    if over_budget(r, t) != ("softmax",):
        return None
    m, fit = margins(r, t), r.signature
    against = "the native path" if fit.pure_scale is None else "a pure scale"
    return Diagnosis.of("accumulator_dtype/narrow_softmax", True,
                        f"each token's softmax is off by its own factor: their spread is {fit.softmax_spread:.2f}x"
                        f" {against}'s ({fit.spread_sigmas():.0f} sigma on {fit.tokens} tokens, rms"
                        f" {fit.softmax_excess:.1e} beyond it), while loss and gradients are within budget (margins"
                        f" {m['loss']:.2f}, {m['grad_hidden'] or 0.0:.2f}, {m['grad_weight'] or 0.0:.2f}): each"
                        " token's rounding cancels in the mean; the softmax's statistics (running max, sum-exp, lse)"
                        " are held in a narrower dtype than the contract declares",
                        {**core_evidence(r), **fit_evidence(fit)})


def ignored_rows(r: ParityReport, sizes: Mapping[str, int], t: Thresholds) -> Diagnosis | None:
    """dL/dh off on ignored tokens, where the reference's is 0 (or, under a z-loss over all positions, that
    z-loss's alone: then only with the loss within budget, since a z-loss dropped or doubled moves the loss and
    dL/dh on every row, and the ``z_loss`` rule names it)."""
    if r.grad_hidden_ignored_norm is None or not r.grad_hidden_norm_ref:
        return None
    if r.grad_hidden_ignored_norm <= r.budget.grad_hidden_rel * r.grad_hidden_norm_ref:
        return None
    if z_loss_over_all_positions(r):
        if r.loss_rel_err > r.budget.loss_rel:
            return None
        return Diagnosis.of("ignore_index_leak/ignored_rows", True,
                            f"loss within budget, but dL/dh on ignored tokens is off by norm"
                            f" {r.grad_hidden_ignored_norm:.4g} from the reference's (there the z-loss over all"
                            " positions alone): padding targets are gathered as real classes, or that z-loss's"
                            " gradient reaches the ignored rows wrongly",
                            {**core_evidence(r), "grad_hidden_ignored_norm": r.grad_hidden_ignored_norm})
    return Diagnosis.of("ignore_index_leak/ignored_rows", True,
                        f"dL/dh is non-zero on ignored tokens (norm {r.grad_hidden_ignored_norm:.4g}, reference 0):"
                        " padding targets are gathered as real classes",
                        {**core_evidence(r), "grad_hidden_ignored_norm": r.grad_hidden_ignored_norm})
