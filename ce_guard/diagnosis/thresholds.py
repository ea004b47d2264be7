"""Every number the verdict and the diagnosis hold a report to, each with where it was measured or why.

A share, a cosine or a count of standard errors: never a budget (that is earned per check by the native path,
``ce_guard.budget``). Tolerances written as ``n * budget`` are multiples of the check's own budget.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields


@dataclass(frozen=True, kw_only=True)
class Thresholds:
    """The cut-offs of the verdict (is this drift?) and of the diagnosis (which fault?), defaults as calibrated.

    Change one only with a measurement beside it: the defaults hold the false-alarm and power tables of
    docs/benchmarks.md ("Calibration", "Naming at the margin").

    Example:
        >>> Thresholds().flag_spread_sigmas, Thresholds().name_spread_sigmas
        (5.0, 3.0)
        >>> Thresholds(rounding_coupling=0)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: `Thresholds.rounding_coupling` must be a positive finite number, got 0. Leave it out to keep ...
    """

    # -- The verdict: the softmax line (``margin_softmax``). A spread this far past native is drift by itself.
    # Standard errors by which each token's softmax may spread wider than the native path's before the check drifts on
    # the spread alone. High, as a drift stops training: 2,000 clean bf16 checks read at most a quarter of the line
    # (docs/benchmarks.md, "The softmax spread as a compared quantity").
    flag_spread_sigmas: float = 5.0
    # rms of the per-token softmax factor beyond native that a narrower dtype leaves: fp16's unit roundoff. Without it
    # fp32 scales (spread 1.3x native at rms 2e-7) read as narrow accumulators (docs/benchmarks.md, session 7 ladders).
    narrow_softmax: float = 2.0 ** -11

    # -- Scales: loss and gradients off by one factor.
    # A pure scale, or a doubled all-reduce, leaves dL/dh's direction intact (docs/faults.md rows 1, 2, 11).
    scale_cosine: float = 0.999
    # A loss ratio within this many loss budgets of 1 is rounding, not a scale: a correct path stays under one.
    scale_loss_budgets: float = 2.0
    # dL/dh's ratio may differ from the loss's by its own budget plus this share of the scale: under SP it mixes
    # several ranks' divisors, the loss only this rank's.
    scale_gradient_slack: float = 0.1
    # Relative tolerance on (factor - 1) when a factor is traced to a count or a group size.
    scale_tolerance: float = 0.005
    # ... and at least this many loss budgets: a small factor's relative tolerance alone would sit under rounding.
    named_scale_loss_budgets: float = 4.0
    # ... and at least this, absolute: exact arithmetic (fp64 checks) leaves no budget to speak of.
    scale_floor: float = 1e-6
    # Two token counts closer than this (relative) are one count: counts are integers, or one over a group size.
    same_count: float = 1e-9
    # A doubled TP all-reduce reads a norm ratio of TP within this many of rounding's scales (``budget.grad_scale``)
    # per unit of TP.
    doubled_grad_scales: float = 4.0

    # -- Loss offsets: log(TP), z * mean(lse^2), local-V smoothing.
    # Relative tolerance on a named offset (docs/faults.md rows 7 and 8); z-loss's reads within 2% in fp32 and bf16
    # (tests/test_diagnose.py).
    offset_tolerance: float = 0.05
    # A fused loss that differs across TP ranks by more than this share of the offset is local-V smoothing (each
    # rank smooths over its own slice; docs/faults.md, row 6).
    rank_spread_share: float = 0.5

    # -- Where the error sits: slice edges, a common row.
    # Share of the dL/dW error on the slice's first and last rows at which the partition is to blame: one
    # boundary-target token in 1,024 puts 100% there (docs/faults.md, row 4).
    edge_row_share: float = 0.5
    # Share of the dL/dh error on tokens whose target sits on a slice edge ...
    boundary_share: float = 0.5
    # ... while those tokens are fewer than this fraction of the batch (else the share says nothing).
    boundary_tokens: float = 0.25
    # Share of a gradient's error in one row common to all rows: a constant dL/dz shift puts all of it there,
    # rounding about 1/rows (docs/faults.md, row 6).
    shift_share: float = 0.5

    # -- The signature fit (ce_guard/signature.py).
    # Standard errors a fitted coefficient must clear to be read as a fault's signature, and the most a shift beside
    # a scale may read and still be rounding. A 1.002x bf16 scale reads 45-48 (docs/benchmarks.md, "Naming at the
    # margin"); a correct bf16 path's scale stays under 5 (tests/test_signature.py).
    significant: float = 5.0
    # Standard errors within which a fitted coefficient agrees with the value a fault predicts: the loss's factor for
    # the scale (plus the loss budget), zero or the pure scale's for the target (docs/benchmarks.md, "Verdicts at the
    # margin").
    agreement_sigmas: float = 3.0
    # The most a narrow accumulator's rounding moves a factor: two bf16 unit roundoffs (0.78%).
    narrow_rounding: float = 2.0 ** -7
    # Standard errors by which a scale's per-token softmax spread must exceed a pure scale's to be a narrow dtype's.
    # Lower than ``flag_spread_sigmas``: here the check has drifted already and only the name is at stake. On the
    # example model's hidden states scales read 0.93-1.03x (at most 0.3 sigma), bf16 accumulators 1.41-2.28x
    # (3.8-10 sigma): at 5, two of 17 fell short (docs/benchmarks.md, "Naming at the margin").
    name_spread_sigmas: float = 3.0

    # -- A gradient off and not by a scale.
    # Error-to-size coupling (kappa) from which dL/dh's error is a narrow running sum's rounding: skipped terms read
    # 1.00-1.16 (1.18-1.56 for Cut CE on an H200), a bf16 sum over 16-128 vocab blocks 2.3-3.7 (docs/faults.md, row 3).
    rounding_coupling: float = 1.6
    # dL/dh at least this aligned with the reference is the reference perturbed, not another gradient (docs/faults.md
    # rows 3 and 9).
    gradient_cosine: float = 0.9
    # A dL/dh norm ratio further than this from 1 is more than a narrow accumulator's rounding (which moves a factor
    # by up to ``narrow_rounding``).
    precision_ratio: float = 0.05

    # -- Per-token upstream weights (reduction='none'; ce_guard/upstream_fit.py), residuals in units of the upstream's
    # spread over the tokens (docs/faults.md, rows 16 and 17).
    # A reading (one weight for every token, the weights in another order) explains the weights the fused path applied
    # when its rms residual is within this share of the spread, at a scale within this share of 1 (a path rounds every
    # weight by a common factor: Liger-Kernel's bf16 dL/dh reads 0.993-0.996 of the reference's). The reading that is
    # the fault reads 0-0.003 (fp32, bf16); sorted values under a random permutation 0.04-0.07, a sampling error that
    # shrinks as 1/sqrt(tokens) (82-256 tokens fitted, 1 in 7-9 masked); the other readings 1.3-1.9 off the tokens'
    # own weights (tests/test_upstream.py, tests/test_injections.py).
    upstream_agreement: float = 0.1
    # ... and the tokens' own weights at their best scale, k u, must leave at least this many times the reading's
    # residual: 1/tokens in backward brings every weight near a small first one, yet k u explains it exactly.
    upstream_contrast: float = 4.0

    def __post_init__(self) -> None:
        for spec in fields(self):
            value = getattr(self, spec.name)
            number = isinstance(value, (int, float)) and not isinstance(value, bool)
            if not (number and math.isfinite(value) and value > 0):
                raise ValueError(f"`Thresholds.{spec.name}` must be a positive finite number, got {value!r}."
                                 f" Leave it out to keep the calibrated {spec.default:g}.")
