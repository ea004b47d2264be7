"""Rules read before any scale or offset: non-finite values, an empty check, the clean verdict, drift on the
per-token softmax alone, and padding that reaches the hidden gradient."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from ce_guard.diagnosis.causes import Diagnosis
from ce_guard.diagnosis.signals import core_evidence, fit_evidence, headline
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
    """Every target is ignore_index, yet the fused path returned a loss or a gradient."""
    if r.n_visible_global > 0 or not (abs(r.loss_fused) > 0 or bool(r.grad_hidden_norm_fused)):
        return None
    return Diagnosis.of("ignore_index_leak/all_ignored", True,
                        f"every target is ignore_index, yet the fused path returned loss {r.loss_fused:.6g} and"
                        f" dL/dh norm {r.grad_hidden_norm_fused or 0.0:.6g}: padding reaches the loss",
                        core_evidence(r))


def empty(r: ParityReport, sizes: Mapping[str, int], t: Thresholds) -> Diagnosis | None:
    if r.n_visible_global > 0:
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
    if r.grad_hidden_ignored_norm is None or not r.grad_hidden_norm_ref:
        return None
    if r.grad_hidden_ignored_norm <= r.budget.grad_hidden_rel * r.grad_hidden_norm_ref:
        return None
    return Diagnosis.of("ignore_index_leak/ignored_rows", True,
                        f"dL/dh is non-zero on ignored tokens (norm {r.grad_hidden_ignored_norm:.4g}, reference 0):"
                        " padding targets are gathered as real classes",
                        {**core_evidence(r), "grad_hidden_ignored_norm": r.grad_hidden_ignored_norm})
