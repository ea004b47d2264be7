"""The logits-to-loss contract of an output layer, written down so both sides of the seam can be held to it.

A fused linear + cross-entropy path and the reference both read a ``CEContract``; neither reads the
other's code. The contract says what the loss *means* (reduction, who owns the divide, penalties) and
where the data lives (layout, vocab slice, process groups), so a diagnosis can say which promise broke.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch.distributed import ProcessGroup

from ce_guard._dist import group_size

Reduction = Literal["mean", "sum", "none"]
NormalizeBy = Literal["local_tokens", "global_tokens", "given_count"]
GradSync = Literal["average", "sum"]
Layout = Literal["[N,V]", "[S,B,V/TP]", "[S/SP,B,V/TP]"]
ZLossPositions = Literal["counted", "all"]
L2WarpRows = Literal["all", "counted"]

REDUCTIONS = ("mean", "sum", "none")
NORMALIZE_BY = ("local_tokens", "global_tokens", "given_count")
GRAD_SYNC = ("average", "sum")
LAYOUTS = ("[N,V]", "[S,B,V/TP]", "[S/SP,B,V/TP]")
Z_LOSS_POSITIONS = ("counted", "all")
L2_WARP_ROWS = ("all", "counted")
ACCUM_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


@dataclass(frozen=True, kw_only=True)
class CEContract:
    """The promises an output layer makes about its cross-entropy.

    Args:
        vocab_size: global vocabulary size V, also the V of label smoothing's uniform term.
        reduction: ``mean`` (divide by a token count), ``sum``, or ``none`` (per-token losses).
        normalize_by: which count owns a ``mean``'s divide: this rank's non-ignored tokens, the
            non-ignored tokens summed over ``token_group``, or ``given_count``: a count the caller hands in
            with each step and the reference does not count (transformers' ``num_items_in_batch``: the sum
            of the per-token losses over it).
        token_group: the group whose tokens a global mean counts (data parallel, or DP x CP).
            Never the TP group: TP ranks see the same tokens and would double count them.
        grad_sync: how the strategy combines gradients over ``token_group``. DDP and FSDP
            ``average``, so a global mean divides by the global count over the group size; ``sum``
            (Megatron's per-token loss) divides by the global count itself.
        ignore_index: targets with this value add nothing to the loss, the count or the gradients.
        label_smoothing: PyTorch's formula, ``(1-eps) * nll + eps * (lse - mean_v logit_v)``, with the
            mean over the *global* V.
        z_loss: coefficient on ``lse**2``.
        z_loss_positions: where the z-loss is taken. ``counted``: ``z_loss * lse**2`` added to each
            non-ignored token's loss, inside the reduction. ``all`` (transformers' ``BambaForCausalLM``):
            ``z_loss`` times the mean of ``lse**2`` over every row this rank holds, ignored targets included,
            added to the reduced loss and never divided by the mean's count; ignored rows then get a
            gradient. Only with layout ``[N,V]`` and reduction ``mean`` or ``sum``.
        l2_warp: flash-linear-attention's L2-warp penalty factor c (``fla.modules.l2warp.l2_warp``): a gradient-only
            term, the loss value unchanged. Each row t, ignored ones included, gets ``g * c * max_v z_tv / R`` added
            to dL/dz at its argmax (g the upstream gradient of the loss, R per ``l2_warp_rows``): the gradient of
            ``(c / 2) * mean_t max_v z_tv**2``, the max and argmax read from the logits in the input dtype (as
            the model holds them; the first index on a tie). Only with layout ``[N,V]`` and reduction ``mean`` or
            ``sum``.
        l2_warp_rows: the R the penalty averages over: ``all``, every row this rank holds (fla's ``l2_warp``,
            ``B*T``); ``counted``, the mean's divisor (the non-ignored tokens under a local mean; 1 for ``sum``, fla
            0.5.0's fused path).
        logit_multiplier: logits are ``logit_multiplier * (hidden @ weight.T)``, scaled before the softcap
            (Falcon-H1's ``lm_head_multiplier``, Cohere's ``logit_scale``, Granite's ``1/logits_scaling``).
        softcap: if set, logits become ``softcap * tanh(logits / softcap)`` before everything else but
            the multiplier.
        accum_dtype: dtype of the running max, denominator and weight-gradient accumulators.
        layout: ``[N,V]`` (whole vocab on this rank), ``[S,B,V/TP]`` (tokens replicated over the TP
            group, vocab sliced), or ``[S/SP,B,V/TP]`` (sequence sharded over the TP group on the way
            in, gathered before the vocab-parallel loss).
        vocab_start: first global vocab id held by this rank's weight slice.
        vocab_end: one past the last id of this rank's slice; defaults to ``vocab_size``.
        tp_group: the group the vocab is sliced over (and the sequence, for the SP layout).

    Example:
        >>> print(CEContract(vocab_size=32000, label_smoothing=0.1))  # doctest: +ELLIPSIS
        CEContract(mean over this rank's non-ignored tokens, ignore_index=-100, label smoothing 0.1 over global V=32000, ...)
    """

    vocab_size: int
    reduction: Reduction = "mean"
    normalize_by: NormalizeBy = "local_tokens"
    token_group: ProcessGroup | None = field(default=None, compare=False)
    grad_sync: GradSync = "average"
    ignore_index: int = -100
    label_smoothing: float = 0.0
    z_loss: float = 0.0
    z_loss_positions: ZLossPositions = "counted"  # PaLM's per-token z-loss; "all" is Bamba's mean over rows
    l2_warp: float = 0.0  # 0: no penalty, as every model but fla's RWKV-style ones
    l2_warp_rows: L2WarpRows = "all"  # fla's l2_warp divides by B*T
    logit_multiplier: float = 1.0  # 1: plain logits, as most models have
    softcap: float | None = None
    accum_dtype: torch.dtype = torch.float32
    layout: Layout = "[N,V]"
    vocab_start: int = 0
    vocab_end: int | None = None
    tp_group: ProcessGroup | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if self.vocab_end is None:
            object.__setattr__(self, "vocab_end", self.vocab_size)
        _expect(isinstance(self.vocab_size, int) and self.vocab_size > 0,
                f"`vocab_size` must be a positive int, got {self.vocab_size!r}.")
        _expect(self.reduction in REDUCTIONS, f"`reduction` must be one of {REDUCTIONS}, got {self.reduction!r}.")
        _expect(self.normalize_by in NORMALIZE_BY,
                f"`normalize_by` must be one of {NORMALIZE_BY}, got {self.normalize_by!r}.")
        _expect(self.grad_sync in GRAD_SYNC, f"`grad_sync` must be one of {GRAD_SYNC}, got {self.grad_sync!r}.")
        _expect(self.normalize_by == "local_tokens" or self.reduction == "mean",
                f"`normalize_by={self.normalize_by!r}` only applies to reduction='mean', got"
                f" reduction={self.reduction!r}. Use normalize_by='local_tokens' for 'sum' and 'none'.")
        _expect(self.layout in LAYOUTS, f"`layout` must be one of {LAYOUTS}, got {self.layout!r}.")
        _expect(isinstance(self.ignore_index, int), f"`ignore_index` must be an int, got {self.ignore_index!r}.")
        _expect(not 0 <= self.ignore_index < self.vocab_size,
                f"`ignore_index`={self.ignore_index} is a real class id in [0, {self.vocab_size});"
                " pick a value outside the vocabulary (PyTorch's default is -100).")
        _expect(_finite_number(self.label_smoothing) and 0.0 <= self.label_smoothing < 1.0,
                f"`label_smoothing` must be in [0, 1), got {self.label_smoothing!r}.")
        _expect(_finite_number(self.z_loss) and self.z_loss >= 0.0,
                f"`z_loss` must be a finite number >= 0, got {self.z_loss!r}.")
        _expect(self.z_loss_positions in Z_LOSS_POSITIONS,
                f"`z_loss_positions` must be one of {Z_LOSS_POSITIONS}, got {self.z_loss_positions!r}.")
        _expect(self.z_loss_positions == "counted" or (self.layout == "[N,V]" and self.reduction != "none"),
                f"`z_loss_positions='all'` needs layout '[N,V]' and reduction 'mean' or 'sum' (one mean over this"
                f" rank's rows, added to a reduced loss), got layout {self.layout!r} and reduction"
                f" {self.reduction!r}. Use z_loss_positions='counted' for a per-token z-loss.")
        _expect(_finite_number(self.l2_warp) and self.l2_warp >= 0.0,
                f"`l2_warp` must be a finite number >= 0, got {self.l2_warp!r}.")
        _expect(self.l2_warp_rows in L2_WARP_ROWS,
                f"`l2_warp_rows` must be one of {L2_WARP_ROWS}, got {self.l2_warp_rows!r}.")
        _expect(not self.l2_warp or (self.layout == "[N,V]" and self.reduction != "none"),
                f"`l2_warp` needs layout '[N,V]' (each row's argmax over the whole vocabulary) and reduction 'mean'"
                f" or 'sum' (a scalar upstream), got layout {self.layout!r} and reduction {self.reduction!r}.")
        _expect(_finite_number(self.logit_multiplier) and self.logit_multiplier > 0,
                f"`logit_multiplier` must be a finite number > 0, got {self.logit_multiplier!r}.")
        _expect(self.softcap is None or (_finite_number(self.softcap) and self.softcap > 0),
                f"`softcap` must be None or a finite number > 0, got {self.softcap!r}.")
        _expect(self.accum_dtype in ACCUM_DTYPES,
                f"`accum_dtype` must be one of {ACCUM_DTYPES}, got {self.accum_dtype!r}.")
        _expect(0 <= self.vocab_start < self.vocab_end <= self.vocab_size,
                f"vocab slice [{self.vocab_start}, {self.vocab_end}) must be non-empty and inside"
                f" [0, {self.vocab_size}).")
        _expect(self.layout != "[N,V]" or self.is_full_vocab,
                f"layout '[N,V]' holds the whole vocabulary, but the slice is [{self.vocab_start},"
                f" {self.vocab_end}) of {self.vocab_size}. Declare layout='[S,B,V/TP]' for a vocab-parallel slice.")

    @property
    def vocab_slice_size(self) -> int:
        return self.vocab_end - self.vocab_start

    @property
    def is_full_vocab(self) -> bool:
        return self.vocab_start == 0 and self.vocab_end == self.vocab_size

    @property
    def sequence_parallel(self) -> bool:
        return self.layout == "[S/SP,B,V/TP]"

    def describe_normalization(self) -> str:
        """Which count owns the divide, in words (the sentence a receipt states)."""
        if self.reduction == "sum":
            return "sum over tokens (no divide)"
        if self.reduction == "none":
            return "per-token losses (no reduction)"
        if self.normalize_by == "given_count":
            return "mean over a count given with each step (transformers' num_items_in_batch)"
        if self.normalize_by == "local_tokens":
            scope = "the gathered sequence's" if self.sequence_parallel else "this rank's"
            return f"mean over {scope} non-ignored tokens"
        size = group_size(self.token_group)
        how = "divided by the group size, as gradients are averaged" if self.grad_sync == "average" else (
            "gradients summed over the group")
        return f"mean over global non-ignored tokens summed over a token group of {size} ({how})"

    def __str__(self) -> str:
        parts = [self.describe_normalization(), f"ignore_index={self.ignore_index}"]
        parts.append(f"label smoothing {self.label_smoothing:g} over global V={self.vocab_size}"
                     if self.label_smoothing else f"no label smoothing, V={self.vocab_size}")
        if not self.z_loss:
            parts.append("no z-loss")
        else:
            parts.append(f"z-loss {self.z_loss:g}*lse^2" if self.z_loss_positions == "counted"
                         else f"z-loss {self.z_loss:g}*mean lse^2 over all positions")
        if self.l2_warp:
            rows = "every row" if self.l2_warp_rows == "all" else "the divisor"
            parts.append(f"L2-warp {self.l2_warp:g} over {rows}")
        if self.logit_multiplier != 1:
            parts.append(f"logits x {self.logit_multiplier:g}")
        parts.append(f"softcap {self.softcap:g}" if self.softcap else "no softcap")
        parts.append(f"{_dtype_name(self.accum_dtype)} accumulators")
        if self.is_full_vocab and group_size(self.tp_group) == 1:
            parts.append(f"layout {self.layout}, whole vocabulary on this rank")
        else:
            parts.append(f"layout {self.layout}, vocab slice [{self.vocab_start}, {self.vocab_end}) over a TP group"
                         f" of {group_size(self.tp_group)}")
        return "CEContract(" + ", ".join(parts) + ")"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready record for receipts; process groups become their sizes."""
        return {
            "vocab_size": self.vocab_size,
            "reduction": self.reduction,
            "normalize_by": self.normalize_by,
            "token_group_size": group_size(self.token_group),
            "grad_sync": self.grad_sync,
            "ignore_index": self.ignore_index,
            "label_smoothing": self.label_smoothing,
            "z_loss": self.z_loss,
            "z_loss_positions": self.z_loss_positions,
            "l2_warp": self.l2_warp,
            "l2_warp_rows": self.l2_warp_rows,
            "logit_multiplier": self.logit_multiplier,
            "softcap": self.softcap,
            "accum_dtype": _dtype_name(self.accum_dtype),
            "layout": self.layout,
            "vocab_start": self.vocab_start,
            "vocab_end": self.vocab_end,
            "tp_group_size": group_size(self.tp_group),
        }

    @classmethod
    def from_dict(cls, record: dict[str, Any], **groups: ProcessGroup | None) -> "CEContract":
        """Inverse of :meth:`to_dict`; groups are not serialisable, so pass them back in by keyword.

        A record written before a field existed loads with that field's default."""
        known = {k: v for k, v in record.items() if k not in ("token_group_size", "tp_group_size")}
        unknown = set(known) - set(cls.__dataclass_fields__)
        _expect(not unknown, f"unknown CEContract fields {sorted(unknown)}; was the record written by a newer ce_guard?")
        if "accum_dtype" in known:
            known["accum_dtype"] = _dtype_from_name(known["accum_dtype"])
        return cls(**known, **groups)


def _expect(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def _finite_number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dtype_from_name(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    _expect(isinstance(dtype, torch.dtype), f"`accum_dtype` {name!r} is not a torch dtype.")
    return dtype
