"""Transformer Engine's ``parallel_cross_entropy`` under the guard, each of its released bugs on a pinned version.

Nothing here injects a fault: every wrong number comes from the code of the wheel named in the test (loaded by
``te_wheels``; on a CPU its Triton kernels run in Triton's interpreter). Each bug is named on a version that has it
and the same check is clean on 2.20.2. The wheels are listed in tests/pins/transformer-engine.txt; without them
the tests skip with the download command.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from dist_helpers import run_distributed
from te_wheels import te_or_skip

from ce_guard import SeamOutputs, SeamRecord, check_seam
from ce_guard.te_adapter import TransformerEngineCrossEntropy

FIXED = "2.20.2"
S, B, D, V = 8, 4, 16, 128  # 32 tokens; the interpreter runs one program per token
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # TE's kernels on the GPU where there is one
ON_CPU = pytest.mark.skipif(torch.cuda.is_available(), reason="gloo ranks or Lightning's CPU trainer: run where"
                            " Triton's interpreter runs TE's kernels (the CPU suite)")


def _inputs(seed: int, dtype: torch.dtype, *, pad: bool, batch_first: bool = False):
    """Hidden ``[S, B, D]`` (``[B, S, D]`` batch-first), the full weight ``[V, D]``, targets; every 7th ignored."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(S, B, D, generator=gen)
    weight = torch.randn(V, D, generator=gen) * (2 / D ** 0.5)
    targets = torch.randint(0, V, (S, B), generator=gen)
    if pad:
        targets.view(-1)[::7] = -100
    if batch_first:
        hidden, targets = hidden.transpose(0, 1).contiguous(), targets.transpose(0, 1).contiguous()
    return hidden.to(dtype), weight.to(dtype), targets


def with_room(pce):
    """``pce`` handed a copy of its input that has the same strides inside a storage S times larger.

    TE to 2.13 steps a ``[S, B, V]`` view of batch-first logits by ``stride(-2) = S*V`` per row, far past the
    tensor's end: on a GPU it reads (and writes its gradient into) whatever lies there; in Triton's CPU interpreter
    it corrupts the heap. The room keeps those reads and writes inside one allocation; the copy is autograd's, so
    the gradient still reaches the logits.
    """
    def call(inp, *args):
        room = inp.new_zeros(inp.numel() * S).as_strided(inp.shape, inp.stride())
        return pce(room.copy_(inp), *args)
    return call


def te_check(version: str, *, dtype=torch.float32, reduction="none", upstream="ones", pad=True,
             transpose_logits=False, label_smoothing=0.0, tp_group=None, seed=0):
    """One forward and backward of TE ``version`` through the adapter, held to its contract by ``check_seam``.

    ``upstream``: ``"ones"``; ``"tokens"``, a weight per token; ``"transposed"``, the same as a non-contiguous
    (transposed) tensor, as a caller that weighs the per-token losses batch-first hands it back.
    """
    pce = with_room(te_or_skip(version)) if transpose_logits else te_or_skip(version)
    hidden, full_weight, targets = (t.to(DEVICE) for t in _inputs(seed, dtype, pad=pad, batch_first=transpose_logits))
    layer = TransformerEngineCrossEntropy(D, V, reduction=reduction, label_smoothing=label_smoothing,
                                          tp_group=tp_group, transpose_logits=transpose_logits,
                                          parallel_cross_entropy=pce, device=DEVICE, dtype=dtype)
    contract = layer.ce_contract
    weight = full_weight[contract.vocab_start:contract.vocab_end].clone()                 # (V/TP, D)
    with torch.no_grad():
        layer.weight.copy_(weight)
    layer.checksum_inputs = True  # as the guard sets it on the call it records
    h = hidden.clone().requires_grad_()
    loss = layer(h, targets)
    if reduction == "mean":
        grad = 1.0
        loss.backward()
    else:
        w = (torch.rand(loss.shape, generator=torch.Generator().manual_seed(99)) + 0.5).to(DEVICE)  # (S, B)
        grad = torch.ones_like(loss) if upstream == "ones" else w
        if upstream == "transposed":
            grad = w.T.contiguous().T                                                      # (S, B), strides (1, S)
        loss.backward(grad)
    fused = SeamOutputs(loss=loss.detach().float(), grad_hidden=h.grad, grad_weight=layer.weight.grad)
    record = SeamRecord(hidden=hidden, weight=weight, targets=targets, fused=fused, upstream=grad,
                        input_checksums=layer.input_checksums)
    diagnosis = check_seam(record, contract).diagnosis
    return diagnosis.variant, diagnosis.summary


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_per_token_gradients_divided_by_the_tokens_are_named_on_2_4(dtype):
    """2.2-2.4 divided dL/dlogits by B*S under ``reduce_loss=False`` too; 2.5 divides only when reducing."""
    named, summary = te_check("2.4.0", dtype=dtype)
    assert named == "backward_scale/pure_factor", summary
    assert "1/tokens" in summary or "1/32" in summary or "0.03125" in summary, summary
    assert te_check(FIXED, dtype=dtype)[0] == "within_budget/clean"


def test_one_tokens_upstream_gradient_for_every_token_is_named_on_2_7():
    """To 2.7 the backward multiplied every row by ``grad_output[0]``; 2.8 reads one value per row (PR 2139)."""
    named, summary = te_check("2.7.0", upstream="tokens")
    assert named == "upstream_broadcast/first_token", summary
    assert te_check(FIXED, upstream="tokens")[0] == "within_budget/clean"


def test_a_non_contiguous_upstream_read_in_storage_order_is_named_on_2_8():
    """2.8-2.10 indexed a per-token ``grad_output`` by row with stride 1 whatever its strides; 2.11 makes it
    contiguous first (PR 2402)."""
    named, summary = te_check("2.8.0", upstream="transposed")
    assert named == "upstream_order/transposed", summary
    assert te_check("2.8.0", upstream="tokens")[0] == "input_mutation/logits"  # contiguous: read right (#18 aside)
    assert te_check(FIXED, upstream="transposed")[0] == "within_budget/clean"


def test_padding_in_the_mean_is_named_on_2_11():
    """2.4-2.11 divided the reduced loss and its gradient by every row; 2.12 counts the non-ignored rows."""
    named, summary = te_check("2.11.0", reduction="mean")
    assert named == "ignore_index_leak/padding_in_divisor", summary
    assert te_check(FIXED, reduction="mean")[0] == "within_budget/clean"


def test_a_transposed_logits_view_misread_is_named_on_2_13():
    """To 2.13 the kernels stepped rows by ``stride(-2)`` alone, so a ``[S, B, V]`` view of batch-first logits was
    read in the wrong rows; 2.14 indexes both leading dimensions by their strides."""
    named, summary = te_check("2.13.0", reduction="mean", pad=False, transpose_logits=True)
    assert named != "within_budget/clean", summary
    assert te_check(FIXED, reduction="mean", pad=False, transpose_logits=True)[0] == "within_budget/clean"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_the_gradient_written_into_the_callers_logits_is_named_on_2_17(dtype):
    """To 2.17 the forward wrote dL/dlogits into the logits' storage (in their dtype: bf16 rounded before the
    upstream scale); 2.18 writes it into a new fp32 buffer."""
    named, summary = te_check("2.17.1", dtype=dtype, reduction="mean", pad=False)
    assert named == "input_mutation/logits", summary
    assert te_check(FIXED, dtype=dtype, reduction="mean", pad=False)[0] == "within_budget/clean"


def _smoothing(rank: int, world: int) -> dict[str, tuple[str, str]]:
    return {version: te_check(version, reduction="mean", label_smoothing=0.1, tp_group=dist.group.WORLD, pad=False)
            for version in ("2.18.0", FIXED)}


@pytest.mark.distributed
@ON_CPU
def test_label_smoothing_over_the_local_shard_is_named_on_2_18_at_tp2():
    """To 2.18 each TP rank's smoothing term summed only its own vocab slice's logits; 2.19 all-gathers the sum."""
    te_or_skip("2.18.0"), te_or_skip(FIXED)
    for rank, found in enumerate(run_distributed(_smoothing, 2, timeout=600)):
        assert found["2.18.0"][0].startswith("label_smoothing_local_v/"), (rank, found)
        assert found[FIXED][0] == "within_budget/clean", (rank, found)


class _TELM(torch.nn.Module):
    """Embedding -> TE's loss through the adapter: what a user's model around TE looks like to the guard."""

    def __init__(self, pce) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(V, D)
        self.output = TransformerEngineCrossEntropy(D, V, parallel_cross_entropy=pce)

    def forward(self, tokens, targets):
        return self.output(torch.tanh(self.embed(tokens)), targets)


@ON_CPU
@pytest.mark.parametrize("version, named", [("2.17.1", "input_mutation/logits"), (FIXED, "within_budget/clean")])
def test_the_callback_checksums_only_the_call_it_records_and_names_the_mutation(tmp_path, version, named):
    """Under CEParityCallback the adapter checksums the recorded call alone (a checksum reads every logit and
    syncs); 2.17's write into the logits is named at the first check, 2.20.2 is clean."""
    import lightning.pytorch as pl
    from lightning_helpers import trainer
    from torch.utils.data import DataLoader, TensorDataset

    from ce_guard.callbacks import CEParityCallback

    class Lit(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = _TELM(te_or_skip(version))
            self.checksummed = []  # per forward: did the adapter take checksums?

        def training_step(self, batch, batch_idx):
            before = self.model.output.input_checksums
            loss = self.model(*batch)
            self.checksummed.append(self.model.output.input_checksums is not before)
            return loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    gen = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randint(0, V, (8, S), generator=gen), torch.randint(0, V, (8, S), generator=gen))
    parity, lit = CEParityCallback(every_n_steps=2, every_n_steps_while_drifting=None), Lit()
    t, _ = trainer(tmp_path, [parity], max_steps=3)
    t.fit(lit, DataLoader(data, batch_size=2))
    assert [h["variant"] for h in parity.history] == [named, named], parity.history
    assert lit.checksummed == [True, False, True] and lit.model.output.checksum_inputs is False
