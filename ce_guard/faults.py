"""The seam faults an output layer can be told to commit, named after the fault catalogue, docs/faults.md.

For demonstrations and tests only: a layer built with a fault keeps declaring its honest
``CEContract`` while computing the broken thing, which is exactly what the guard must catch.
Kept apart from the layer so a diagnosis can name faults without importing any loss math.
"""

from __future__ import annotations

import enum


class SeamFault(enum.StrEnum):
    """One deliberate break of the logits-to-loss contract (docs/faults.md row in brackets)."""

    LOCAL_NORMALIZATION = "local_normalization"  # [1] divide by this rank's count though the contract says global
    GRAD_SCALE = "grad_scale"  # [2] loss and grads times an integer k (a missing grad-accumulation divide)
    BF16_ACCUMULATORS = "bf16_accumulators"  # [3] max / denominator / dW held in bf16 while declaring fp32
    UNMASKED_PARTITION_TARGETS = "unmasked_partition_targets"  # [4] foreign targets clamped into the slice
    PARTITION_OFF_BY_ONE = "partition_off_by_one"  # [4] the slice admits target == vocab_end
    IGNORE_IN_DENOMINATOR = "ignore_in_denominator"  # [5] ignored tokens counted in the mean's divisor
    SMOOTHING_LOCAL_VOCAB = "smoothing_local_vocab"  # [6] label smoothing's mean over V/TP, not V
    GATHERED_LOGITS_LOG_TP = "gathered_logits_log_tp"  # [7] denominator summed twice over TP: loss + log(TP)
    MISSING_Z_LOSS = "missing_z_loss"  # [8] the z-loss term dropped
