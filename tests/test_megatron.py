"""Megatron-core's own output layer and loss under the guard, on gloo ranks (needs the `megatron` extra).

Nothing here injects a fault: every broken number comes from megatron-core's code. Without label smoothing
its vocab-parallel path must be clean at TP=2 and TP=4; with it, the guard's verdict must agree with what
Megatron itself does, i.e. whether its TP loss differs from its own TP=1 loss on the same inputs.
"""

import sys

import pytest
import torch
import torch.distributed as dist

from ce_guard import SeamOutputs, SeamRecord, check_seam
from dist_helpers import run_distributed
from megatron_pins import megatron_core_for_spawned_ranks

pytest.importorskip("megatron.core", reason="needs the megatron extra: pip install 'ce_guard[megatron]'")
pytestmark = pytest.mark.distributed

# (S, B, D, V): odd sequence lengths and batch sizes, V divisible by 4
SHAPES = [(16, 2, 32, 512), (24, 3, 48, 1024), (40, 2, 64, 2048), (9, 5, 32, 768), (33, 1, 40, 1536)]


def _inputs(seed, shape, dtype, *, prior):
    """Hidden, full weight and targets; ``prior`` adds a frequency-ordered logit prior (low ids frequent, as in
    a BPE vocabulary) through a constant hidden feature."""
    s, b, d, v = shape
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(s, b, d, generator=gen)
    weight = torch.randn(v, d, generator=gen) / d ** 0.5
    if prior:
        hidden[..., 0] = 1.0
        weight[:, 0] = -1.5 * torch.log1p(torch.arange(v, dtype=torch.float32))
    targets = torch.randint(0, v, (s, b), generator=gen)
    targets.view(-1)[::7] = -100
    return hidden.to(dtype), weight.to(dtype), targets


def _megatron_check(hidden, full_weight, targets, **options):
    """Run MegatronOutputLayer forward + backward on this rank's slice, then check_seam on what it produced."""
    from ce_guard.adapters import MegatronOutputLayer

    v, d = full_weight.shape
    layer = MegatronOutputLayer(d, v, device=hidden.device, dtype=hidden.dtype, **options)
    contract = layer.ce_contract
    with torch.no_grad():
        layer.weight.copy_(full_weight[contract.vocab_start:contract.vocab_end])  # (V/TP, D)
    if contract.sequence_parallel:  # this rank's [S/TP, B] shard, sequence first
        rows = hidden.shape[0] // dist.get_world_size(contract.tp_group)
        shard = slice(dist.get_rank(contract.tp_group) * rows, (dist.get_rank(contract.tp_group) + 1) * rows)
        hidden, targets = hidden[shard], targets[shard]
    h = hidden.detach().clone().requires_grad_()
    loss = layer(h, targets)
    loss.backward()
    fused = SeamOutputs(loss=loss.detach().float(), grad_hidden=h.grad, grad_weight=layer.weight.grad)
    record = SeamRecord(hidden=hidden, weight=layer.weight.detach(), targets=targets, fused=fused, upstream=1.0)
    result = check_seam(record, contract)
    return loss.detach(), h.grad, result


def _reinit_megatron(tp_group):
    from megatron.core import parallel_state

    from ce_guard.adapters import megatron_tensor_parallel

    parallel_state.destroy_model_parallel()
    megatron_tensor_parallel(tp_group)


def clean_cases(rank, world, n_seeds):
    """No smoothing: every check within budget, fp32 and bf16, with and without a frequency-ordered prior."""
    out = []
    for dtype in (torch.float32, torch.bfloat16):
        for seed in range(n_seeds):
            shape = SHAPES[seed % len(SHAPES)]
            hidden, weight, targets = _inputs(seed, shape, dtype, prior=seed % 2 == 1)
            *_, result = _megatron_check(hidden, weight, targets, tp_group=dist.group.WORLD)
            out.append((str(dtype), seed, result.diagnosis.cause.value, result.diagnosis.summary[:200]))
    return out


def smoothing_cases(rank, world):
    """Label smoothing 0.1: the guard at TP=world, and Megatron against itself (TP=world vs its own TP=1).

    Megatron's self-comparison runs in fp32 on the same (upcast) inputs, so it measures what its TP code does
    to the math, not rounding; the effect is stated in units of the guard's budget for the check's dtype.
    """
    cases = [(dtype, prior, shape) for dtype in (torch.float32, torch.bfloat16) for prior in (True, False)
             for shape in (SHAPES[2], SHAPES[1])]

    def run(i, dtype, prior, shape, **options):
        hidden, weight, targets = _inputs(100 + i, shape, dtype, prior=prior)
        checked = _megatron_check(hidden, weight, targets, label_smoothing=0.1, **options)
        exact = _megatron_check(hidden.float(), weight.float(), targets, label_smoothing=0.1, **options)
        return checked[2], exact[0], exact[1]

    at_tp = [run(i, *case, tp_group=dist.group.WORLD) for i, case in enumerate(cases)]
    _reinit_megatron(None)  # TP = 1: every rank holds the whole vocabulary
    out = []
    for i, (case, (result, loss_tp, grad_tp)) in enumerate(zip(cases, at_tp)):
        result_tp1, loss_tp1, grad_tp1 = run(i, *case)
        r = result.report
        out.append(dict(dtype=str(case[0]), prior=case[1], cause=result.diagnosis.cause.value,
                        drift=result.diagnosis.drift, summary=result.diagnosis.summary,
                        tp1_cause=result_tp1.diagnosis.cause.value,
                        loss_shift=float((loss_tp - loss_tp1).abs()) / abs(r.loss_ref),
                        grad_shift=float((grad_tp - grad_tp1).norm() / grad_tp1.norm()),
                        loss_budget=r.budget.loss_rel, grad_budget=r.budget.grad_hidden_rel))
    return out


def fused_native_case(rank, world):
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        hidden, weight, targets = _inputs(5, SHAPES[0], dtype, prior=True)
        *_, result = _megatron_check(hidden, weight, targets, tp_group=dist.group.WORLD, cross_entropy_fusion=True)
        out[str(dtype)] = (result.diagnosis.cause.value, result.diagnosis.summary)
    return out


@pytest.mark.parametrize("world,n_seeds", [(2, 60), (4, 20)])  # 4 ranks on 2 cores: fewer seeds, same shapes
def test_megatron_output_layer_is_clean_without_smoothing(world, n_seeds):
    results = run_distributed(clean_cases, world, n_seeds, timeout=600)
    assert len(results[0]) == 2 * n_seeds
    for rank_checks in results:
        drifting = [c for c in rank_checks if c[2] != "within_budget"]
        assert not drifting, drifting


@pytest.mark.parametrize("world", [2, 4])
def test_megatron_local_vocab_smoothing_is_named_exactly_when_megatron_differs_from_its_tp1(world):
    results = run_distributed(smoothing_cases, world, timeout=600)
    for rank, cases in enumerate(results):
        for case in cases:
            assert case["tp1_cause"] == "within_budget", case  # Megatron's convention, mapped, holds at TP=1
            same = case["loss_shift"] < 1e-5 and case["grad_shift"] < 1e-5  # fp32: TP changes nothing
            visible = case["loss_shift"] > case["loss_budget"] or case["grad_shift"] > case["grad_budget"]
            if same:  # upstream fixed: the guard must stay quiet
                assert not case["drift"], (rank, case)
            if visible or case["drift"]:  # Megatron's TP math moved more than rounding could hide: named
                assert case["cause"] == "label_smoothing_local_v", (rank, case)
                assert "local vocab slice" in case["summary"], case
    # megatron-core 0.16-0.19 does differ, and on a frequency-ordered vocabulary visibly so in both dtypes.
    assert all(c["cause"] == "label_smoothing_local_v" for cases in results for c in cases if c["prior"]), results
    assert all(c["drift"] for cases in results for c in cases if c["dtype"] == "torch.float32"), results


def test_megatron_fused_native_cross_entropy_rounds_the_logit_gradient_to_bf16():
    """megatron-core's 'native' fused CE casts dL/dlogits to bf16 whatever the logits' dtype: an fp32 run gets a
    bf16 hidden gradient (named), a bf16 run loses nothing it had (clean)."""
    results = run_distributed(fused_native_case, 2, timeout=600)
    for res in results:
        cause, summary = res["torch.float32"]
        assert cause == "accumulator_dtype" and "loss exact" in summary and "logit gradient" in summary, summary
        assert res["torch.bfloat16"][0] == "within_budget", res


def sequence_parallel_on_cpu(rank, world):
    from ce_guard.adapters import MegatronOutputLayer

    with pytest.raises(ValueError, match="sequence_parallel=True needs the weight on a GPU"):
        MegatronOutputLayer(32, 512, tp_group=dist.group.WORLD, sequence_parallel=True)
    return True


def test_megatron_sequence_parallel_on_cpu_is_refused_with_the_reason():
    assert run_distributed(sequence_parallel_on_cpu, 2) == [True, True]


def sequence_parallel_cuda_cases(rank, world):
    """Megatron's sequence-parallel layout (all-gather in, reduce-scatter of dL/dh out) on gloo ranks sharing GPU 0."""
    torch.cuda.set_device(0)
    out = []
    for i, (dtype, smoothing) in enumerate([(torch.float32, 0.0), (torch.bfloat16, 0.0), (torch.float32, 0.1),
                                            (torch.bfloat16, 0.1)]):
        hidden, weight, targets = _inputs(200 + i, SHAPES[2], dtype, prior=True)
        *_, result = _megatron_check(hidden.cuda(), weight.cuda(), targets.cuda(), tp_group=dist.group.WORLD,
                                     sequence_parallel=True, label_smoothing=smoothing)
        out.append((str(dtype), smoothing, result.diagnosis.cause.value, result.diagnosis.summary[:160]))
    return out


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="Megatron's sequence-parallel gather needs CUDA")
def test_megatron_sequence_parallel_layout_on_cuda():
    for rank_cases in run_distributed(sequence_parallel_cuda_cases, 2, timeout=300):
        for dtype, smoothing, cause, summary in rank_cases:
            assert cause == ("label_smoothing_local_v" if smoothing else "within_budget"), (dtype, smoothing, summary)


def test_megatron_adapter_without_the_package_names_the_extra(monkeypatch):
    from ce_guard.adapters import MegatronOutputLayer

    monkeypatch.setitem(sys.modules, "megatron.core", None)
    with pytest.raises(ImportError, match=r"pip install 'ce_guard\[megatron\]'"):
        MegatronOutputLayer(32, 512)


def handed_logits_cases(rank, world):
    """A head that computes its logits itself, hands them to Megatron's loss and keeps them (as a trainer that also
    reads log-probs or entropy from them does): checksums of the handed logits before the loss and after backward."""
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    from ce_guard import CEContract
    from ce_guard.adapters import megatron_tensor_parallel
    from ce_guard.input_checksums import InputChecksums

    megatron_tensor_parallel(None)
    found = {}
    for dtype in (torch.float32, torch.bfloat16):
        hidden, weight, targets = _inputs(0, SHAPES[0], dtype, prior=False)
        targets = targets.clamp(min=0)                       # Megatron's loss has no ignore index
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        logits = h @ w.T                                     # (S, B, V): the caller's
        kept = logits.detach().float().clone()
        checks = InputChecksums.of(hidden=hidden, weight=weight, logits=logits)
        loss = vocab_parallel_cross_entropy(logits, targets).mean()
        loss.backward()
        checks = checks.measured_after(hidden=hidden, weight=weight, logits=logits)
        record = SeamRecord(hidden=hidden, weight=weight, targets=targets, upstream=1.0, input_checksums=checks,
                            fused=SeamOutputs(loss=loss.detach(), grad_hidden=h.grad, grad_weight=w.grad))
        diagnosis = check_seam(record, CEContract(vocab_size=weight.shape[0])).diagnosis
        found[str(dtype)] = (diagnosis.variant, diagnosis.summary, float((logits.detach().float() - kept).abs().max()),
                             float(logits.detach().float().sum(-1).abs().max()))
    return found


@pytest.mark.parametrize("version", [None, "0.19.2"], ids=["installed", "0.19.2"])
def test_fp32_logits_handed_to_vocab_parallel_cross_entropy_are_overwritten(version):
    """megatron-core 0.16.1 and 0.19.2 (Megatron-LM PR 1594, open): ``vocab_parallel_cross_entropy`` subtracts the
    row max from fp32 logits in place and exponentiates them into themselves (``exp(out=)``), then divides: the
    caller's logits hold the softmax, and after backward the logit gradient (softmax - one-hot, times the upstream).
    bf16 logits are copied by ``.float()`` first and kept. Loss and gradients stay right, so only the checksum
    shows it. When the fix lands (fp32 logits copied too), fp32 reads ``within_budget/clean`` as bf16
    does, and the first assertion flips. A GPTModel's own logits have no reader after its loss, so the in-place
    guard of tests/test_megatron_gpt.py does not checksum them."""
    with megatron_core_for_spawned_ranks(version):
        (found,) = run_distributed(handed_logits_cases, 1, timeout=300)
    variant, _, changed, row_sum = found["torch.float32"]
    print(f"\nfp32: {variant}; logits changed by up to {changed:.3g}, each row then sums to {row_sum:.2g} at most")
    assert variant == "input_mutation/logits" and changed > 0.5 and row_sum < 1e-6, found  # a gradient's rows: 0
    variant, _, changed, _ = found["torch.bfloat16"]
    assert variant == "within_budget/clean" and changed == 0, found
