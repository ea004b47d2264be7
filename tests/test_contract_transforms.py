"""Three promises transformers' causal LMs make: a logit multiplier, a mean over a count handed in with each step
(``num_items_in_batch``) and a z-loss over every position (Bamba's). The reference against float64 autograd
written here from first principles, the contract's validation, the check on a record with a given count, the
fused layer's multiplier, and transformers' own models."""

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from ce_guard import CEContract, SeamOutputs, SeamRecord, check_seam, reference_linear_cross_entropy
from ce_guard.budget import native_error_budget
from ce_guard.diagnosis import Cause
from ce_guard.fused import FusedLinearCrossEntropy
from ce_guard.reference import reduction_plan
from ce_guard.signature import fit_signatures
from ce_guard.testing import FaultyFusedLinearCrossEntropy

IGNORE = -100


def first_principles(hidden, weight, targets, *, multiplier=1.0, softcap=None, smoothing=0.0, z=0.0,
                     z_all=False, given=None, reduction="mean", upstream=1.0):
    """Loss, dL/dh and dL/dW in float64 autograd: ``z = m h W^T``, softcap, CE summed and divided by the given
    count (or the visible tokens), plus z times the mean of lse^2 over every row (or per counted token)."""
    h = hidden.detach().double().requires_grad_()
    w = weight.detach().double().requires_grad_()
    logits = multiplier * (h @ w.T)
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    visible = targets != IGNORE
    lse = torch.logsumexp(logits, dim=-1)
    per_token = F.cross_entropy(logits, targets, reduction="none", ignore_index=IGNORE, label_smoothing=smoothing)
    if not z_all:
        per_token = per_token + z * lse.square() * visible
    if reduction == "none":
        loss = per_token
        loss.backward(torch.as_tensor(upstream, dtype=torch.float64).expand_as(loss))
    else:
        loss = per_token.sum()
        if reduction == "mean":
            loss = loss / (given if given is not None else visible.sum())
        if z_all:
            loss = loss + z * lse.square().mean()
        (loss * upstream).backward()
    return loss.detach(), h.grad, w.grad


def inputs(n=41, d=24, v=97, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=gen)
    weight = torch.randn(v, d, generator=gen) * (3 / math.sqrt(d))
    targets = torch.randint(0, v, (n,), generator=gen)
    targets[::4] = IGNORE  # 11 of 41 ignored
    return hidden.to(dtype), weight.to(dtype), targets


def rel(a, b) -> float:
    return float((a.double() - b).norm() / b.norm())


# contract kwargs -> first_principles kwargs; every case has ignored targets
CASES = {
    "multiplier_mean": (dict(logit_multiplier=0.3), dict(multiplier=0.3)),
    "multiplier_softcap_smoothing_z_sum": (
        dict(reduction="sum", logit_multiplier=1.7, softcap=4.0, label_smoothing=0.1, z_loss=1e-2),
        dict(reduction="sum", multiplier=1.7, softcap=4.0, smoothing=0.1, z=1e-2)),
    "given_count": (dict(normalize_by="given_count"), dict(given=37.0)),
    "given_count_multiplier_softcap_smoothing_z": (
        dict(normalize_by="given_count", logit_multiplier=0.25, softcap=3.0, label_smoothing=0.2, z_loss=1e-3),
        dict(given=113.0, multiplier=0.25, softcap=3.0, smoothing=0.2, z=1e-3)),
    "z_all_mean": (dict(z_loss=0.05, z_loss_positions="all"), dict(z=0.05, z_all=True)),
    "z_all_sum_softcap_smoothing": (
        dict(reduction="sum", z_loss=0.02, z_loss_positions="all", softcap=5.0, label_smoothing=0.1),
        dict(reduction="sum", z=0.02, z_all=True, softcap=5.0, smoothing=0.1)),
    "z_all_given_count_multiplier": (
        dict(normalize_by="given_count", z_loss=0.01, z_loss_positions="all", logit_multiplier=0.5),
        dict(given=64.0, z=0.01, z_all=True, multiplier=0.5)),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", list(CASES))
def test_reference_matches_float64_autograd(case, dtype):
    options, truth = CASES[case]
    hidden, weight, targets = inputs(dtype=dtype)
    contract = CEContract(vocab_size=weight.shape[0], **options)
    upstream = 0.75
    result = reference_linear_cross_entropy(hidden, weight, targets, contract, grad_output=upstream,
                                            given_count=truth.get("given"), token_chunk=16, chunk_elements=16 * 40)
    loss, grad_h, grad_w = first_principles(hidden, weight, targets, upstream=upstream, **truth)
    assert float(result.loss) == pytest.approx(float(loss), rel=2e-6)
    assert rel(result.grad_hidden, grad_h) < 2e-6 and rel(result.grad_weight, grad_w) < 2e-6
    if "given" in truth:
        assert result.divisor == truth["given"]


def test_z_loss_over_all_positions_reaches_ignored_rows_and_stays_out_of_the_per_token_losses():
    hidden, weight, targets = inputs()
    contract = CEContract(vocab_size=weight.shape[0], z_loss=0.05, z_loss_positions="all")
    result = reference_linear_cross_entropy(hidden, weight, targets, contract)
    ignored = targets == IGNORE
    assert float(result.grad_hidden[ignored].norm()) > 1e-3  # Bamba's z-loss has a gradient on padding
    counted = dataclasses.replace(contract, z_loss=0.0)
    plain = reference_linear_cross_entropy(hidden, weight, targets, counted)
    assert torch.equal(result.per_token_loss, plain.per_token_loss)
    assert float(result.loss - plain.loss) == pytest.approx(0.05 * float(result.lse.double().square().mean()), rel=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_per_token_upstream_with_the_multiplier(dtype):
    hidden, weight, targets = inputs(dtype=dtype)
    contract = CEContract(vocab_size=weight.shape[0], reduction="none", logit_multiplier=0.4, softcap=6.0)
    upstream = torch.rand(targets.shape, generator=torch.Generator().manual_seed(1)) + 0.5
    result = reference_linear_cross_entropy(hidden, weight, targets, contract, grad_output=upstream, token_chunk=8)
    loss, grad_h, grad_w = first_principles(hidden, weight, targets, multiplier=0.4, softcap=6.0,
                                            reduction="none", upstream=upstream)
    assert float((result.loss.double() - loss).abs().max()) < 5e-6
    assert rel(result.grad_hidden, grad_h) < 2e-6 and rel(result.grad_weight, grad_w) < 2e-6


@pytest.mark.parametrize("upstream", [1.0, 1e3])
def test_fp16_backward_operands_keep_ignored_rows_z_gradient_in_range(upstream):
    """The fp16 gradient operands are scaled per row by the bound |w + 2 zw lse| + |w|; an ignored row's
    z-loss gradient must be in that bound too, or its scaled logit gradient overflows fp16."""
    hidden, weight, targets = inputs(dtype=torch.bfloat16)
    contract = CEContract(vocab_size=weight.shape[0], z_loss=0.1, z_loss_positions="all", logit_multiplier=3.0)
    result = reference_linear_cross_entropy(hidden, weight, targets, contract, grad_output=upstream,
                                            backward_dtype=torch.float16)
    _, grad_h, grad_w = first_principles(hidden, weight, targets, multiplier=3.0, z=0.1, z_all=True,
                                         upstream=upstream)
    assert rel(result.grad_hidden, grad_h) < 2.0 ** -10 and rel(result.grad_weight, grad_w) < 2.0 ** -10


def test_given_count_may_be_a_one_element_tensor():
    hidden, weight, targets = inputs()
    contract = CEContract(vocab_size=weight.shape[0], normalize_by="given_count")
    as_float = reference_linear_cross_entropy(hidden, weight, targets, contract, given_count=50.0)
    as_tensor = reference_linear_cross_entropy(hidden, weight, targets, contract, given_count=torch.tensor(50))
    assert torch.equal(as_float.loss, as_tensor.loss) and as_tensor.divisor == 50.0


@pytest.mark.parametrize("normalize_by, given, message", [
    ("given_count", None, "divides its mean by a count given with each step, but `given_count` is None"),
    ("local_tokens", 30.0, "does not divide by a given count"),
    ("given_count", 0, "`given_count` must be a finite number > 0"),
    ("given_count", -3.0, "`given_count` must be a finite number > 0"),
    ("given_count", float("nan"), "`given_count` must be a finite number > 0"),
    ("given_count", float("inf"), "`given_count` must be a finite number > 0"),
    ("given_count", True, "`given_count` must be a finite number > 0"),
    ("given_count", torch.tensor([3.0, 4.0]), "`given_count` must be a finite number > 0"),
])
def test_the_given_count_is_checked_against_the_contract(normalize_by, given, message):
    hidden, weight, targets = inputs()
    contract = CEContract(vocab_size=weight.shape[0], normalize_by=normalize_by)
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        reference_linear_cross_entropy(hidden, weight, targets, contract, given_count=given)


@pytest.mark.parametrize("kwargs, message", [
    (dict(logit_multiplier=0.0), "`logit_multiplier` must be a finite number > 0"),
    (dict(logit_multiplier=-1.0), "`logit_multiplier` must be a finite number > 0"),
    (dict(logit_multiplier=float("inf")), "`logit_multiplier` must be a finite number > 0"),
    (dict(logit_multiplier=True), "`logit_multiplier` must be a finite number > 0"),
    (dict(normalize_by="given_count", reduction="sum"), "`normalize_by='given_count'` only applies to reduction='mean'"),
    (dict(normalize_by="given_count", reduction="none"), "only applies to reduction='mean'"),
    (dict(z_loss_positions="rows"), "`z_loss_positions` must be one of"),
    (dict(z_loss=0.1, z_loss_positions="all", reduction="none"), "`z_loss_positions='all'` needs layout '[N,V]'"),
    (dict(z_loss=0.1, z_loss_positions="all", layout="[S,B,V/TP]"), "`z_loss_positions='all'` needs layout '[N,V]'"),
])
def test_invalid_new_promises_name_the_field(kwargs, message):
    escaped = message.replace("[", r"\[").replace("]", r"\]").replace("(", r"\(").replace(")", r"\)")
    with pytest.raises(ValueError, match=escaped):
        CEContract(vocab_size=10, **kwargs)


def test_new_promises_read_as_a_sentence_and_round_trip():
    c = CEContract(vocab_size=64, normalize_by="given_count", z_loss=0.01, z_loss_positions="all",
                   logit_multiplier=0.25, softcap=30.0)
    text = str(c)
    assert text.startswith("CEContract(mean over a count given with each step (transformers' num_items_in_batch)")
    assert "z-loss 0.01*mean lse^2 over all positions, logits x 0.25, softcap 30" in text
    assert "logits x" not in str(CEContract(vocab_size=64))
    assert "num_items_in_batch" in reduction_plan(c)["token_count"]
    record = c.to_dict()
    assert (record["logit_multiplier"], record["z_loss_positions"]) == (0.25, "all")
    assert CEContract.from_dict(record) == c


def test_a_record_without_the_new_fields_loads_their_defaults():
    record = {k: v for k, v in CEContract(vocab_size=8, z_loss=1e-3).to_dict().items()
              if k not in ("logit_multiplier", "z_loss_positions")}
    c = CEContract.from_dict(record)
    assert (c.logit_multiplier, c.z_loss_positions, c.z_loss) == (1.0, "counted", 1e-3)


def _native_outputs(hidden, weight, targets, *, multiplier=1.0, given=None, z=0.0, z_all=False):
    """PyTorch's own path as a transformers model runs it: logits in the input dtype, times the multiplier
    there, CE in fp32 summed and divided by the given count, Bamba's z-loss over every row."""
    h, w = hidden.detach().requires_grad_(), weight.detach().requires_grad_()
    logits = (F.linear(h, w) * multiplier).float()
    loss = F.cross_entropy(logits, targets, ignore_index=IGNORE, reduction="sum") / given
    if z_all:
        loss = loss + z * logits.logsumexp(dim=-1).square().mean()
    loss.backward()
    return SeamOutputs(loss=loss.detach(), grad_hidden=h.grad, grad_weight=w.grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_seam_record_with_a_given_count_runs_clean_and_a_doubled_loss_is_flagged(dtype):
    hidden, weight, targets = inputs(n=256, d=32, v=1000, dtype=dtype)
    contract = CEContract(vocab_size=1000, normalize_by="given_count", z_loss=1e-2, z_loss_positions="all",
                          logit_multiplier=0.3)
    fused = _native_outputs(hidden, weight, targets, multiplier=0.3, given=900.0, z=1e-2, z_all=True)
    record = SeamRecord(hidden=hidden, weight=weight, targets=targets, fused=fused, upstream=1.0, given_count=900.0)
    clean = check_seam(record, contract)
    assert clean.diagnosis.cause == Cause.WITHIN_BUDGET and clean.report.divisor == 900.0
    doubled = dataclasses.replace(record, fused=dataclasses.replace(fused, loss=fused.loss * 2))
    assert check_seam(doubled, contract).diagnosis.drift
    with pytest.raises(ValueError, match="given_count"):
        check_seam(dataclasses.replace(record, given_count=None), contract)


def test_a_fused_path_dividing_by_its_own_count_is_named_against_the_given_one():
    hidden, weight, targets = inputs(n=256, d=32, v=1000)
    contract = CEContract(vocab_size=1000, normalize_by="given_count")
    n_visible = int((targets != IGNORE).sum())
    fused = _native_outputs(hidden, weight, targets, given=float(n_visible))
    record = SeamRecord(hidden=hidden, weight=weight, targets=targets, fused=fused, upstream=1.0, given_count=576.0)
    found = check_seam(record, contract).diagnosis
    assert found.variant == "normalization_owner/token_count", found.summary
    assert "the count given with the step" in found.summary


@pytest.mark.parametrize("how, variant", [(0.0, "z_loss_boundary/missing"), (2.0, "z_loss_boundary/doubled")])
def test_a_z_loss_over_all_positions_dropped_or_doubled_is_named(how, variant):
    """The offset is z times the mean of lse^2 over every row: padding rows with larger logits set it apart from
    the mean over the visible tokens."""
    hidden, weight, targets = inputs(n=256, d=32, v=1000)
    hidden[targets == IGNORE] *= 2
    contract = CEContract(vocab_size=1000, z_loss=0.05, z_loss_positions="all")
    fused = _native_outputs(hidden, weight, targets, given=float((targets != IGNORE).sum()), z=0.05 * how,
                            z_all=True)
    record = SeamRecord(hidden=hidden, weight=weight, targets=targets, fused=fused, upstream=1.0)
    result = check_seam(record, contract)
    assert result.diagnosis.variant == variant, result.diagnosis.summary


def test_a_z_loss_over_all_positions_is_no_padding_leak():
    """The reference's dL/dh on ignored rows is the z-loss's, and with every target ignored the loss is the
    z-loss alone: neither reads as padding reaching the loss."""
    hidden, weight, targets = inputs(n=256, d=32, v=1000)
    contract = CEContract(vocab_size=1000, z_loss=0.05, z_loss_positions="all")
    for labels in (targets, torch.full_like(targets, IGNORE)):
        n_visible = max(int((labels != IGNORE).sum()), 1)
        fused = _native_outputs(hidden, weight, labels, given=float(n_visible), z=0.05, z_all=True)
        record = SeamRecord(hidden=hidden, weight=weight, targets=labels, fused=fused, upstream=1.0)
        result = check_seam(record, contract)
        assert result.diagnosis.cause == Cause.WITHIN_BUDGET, result.diagnosis.summary
        assert result.report.grad_hidden_ignored_norm < 1e-3 * result.report.grad_hidden_norm_ref


def test_a_z_loss_counted_on_visible_tokens_only_is_flagged_under_all_positions():
    hidden, weight, targets = inputs(n=256, d=32, v=1000)
    contract = CEContract(vocab_size=1000, z_loss=0.05, z_loss_positions="all")
    per_token = dataclasses.replace(contract, z_loss_positions="counted")
    ref = reference_linear_cross_entropy(hidden, weight, targets, per_token)
    fused = SeamOutputs(loss=ref.loss, grad_hidden=ref.grad_hidden, grad_weight=ref.grad_weight)
    result = check_seam(SeamRecord(hidden=hidden, weight=weight, targets=targets, fused=fused, upstream=1.0), contract)
    assert result.diagnosis.drift and result.report.grad_hidden_ignored_norm > 0


def test_token_sampling_refuses_a_z_loss_over_all_positions():
    hidden, weight, targets = inputs(n=256, d=32, v=1000)
    contract = CEContract(vocab_size=1000, z_loss=0.05, z_loss_positions="all")
    fused = _native_outputs(hidden, weight, targets, given=1.0, z=0.05, z_all=True)
    record = SeamRecord(hidden=hidden, weight=weight, targets=targets, fused=fused, upstream=1.0)
    with pytest.raises(ValueError, match="z_loss_positions='all'"):
        check_seam(record, contract, sample_tokens=64)


def test_token_sampling_with_a_given_count_matches_the_full_check():
    hidden, weight, targets = inputs(n=256, d=32, v=1000)
    contract = CEContract(vocab_size=1000, normalize_by="given_count", logit_multiplier=0.3)
    fused = _native_outputs(hidden, weight, targets, multiplier=0.3, given=700.0)
    record = SeamRecord(hidden=hidden, weight=weight, targets=targets, fused=fused, upstream=1.0, given_count=700.0)
    sampled = check_seam(record, contract, sample_tokens=64)
    assert sampled.sampled_tokens == 64 and sampled.diagnosis.cause == Cause.WITHIN_BUDGET
    scaled = dataclasses.replace(record, fused=dataclasses.replace(fused, grad_hidden=fused.grad_hidden * 1.5))
    assert check_seam(scaled, contract, sample_tokens=64).diagnosis.drift


def test_the_budget_runs_the_native_path_with_the_multiplier():
    """A budget earned without the multiplier would measure another path's rounding: at m = 8 the bf16 logits
    round eight times coarser, and the measured loss error grows with them."""
    hidden, weight, targets = inputs(n=256, d=32, v=1000, dtype=torch.bfloat16)
    plain = native_error_budget(hidden, weight, targets, CEContract(vocab_size=1000))
    scaled = native_error_budget(hidden, weight, targets, CEContract(vocab_size=1000, logit_multiplier=8.0))
    assert scaled.per_token_abs > 2 * plain.per_token_abs


def test_the_fit_honours_the_multiplier():
    hidden, weight, targets = inputs(n=256, d=32, v=512, dtype=torch.float64)
    contract = CEContract(vocab_size=512, logit_multiplier=0.3, label_smoothing=0.1)
    ref = reference_linear_cross_entropy(hidden, weight, targets, contract)
    grad = ref.grad_hidden.double()
    fit = fit_signatures(hidden, weight, targets, 1.0041 * grad, grad, ref.token_weight, contract)
    assert fit.scale == pytest.approx(0.0041, rel=1e-6) and fit.residual_rel < 1e-9
    # A wrong denominator moves dL/dh along u_i m_i of the effective weight m W: equal scale and target.
    probs = torch.softmax(0.3 * hidden @ weight.T, dim=1)
    u = ref.token_weight.double()[:, None]
    mean_row = u * (probs @ (0.3 * weight))  # u_i m_i
    fit = fit_signatures(hidden, weight, targets, grad + 0.01 * mean_row, grad, ref.token_weight, contract)
    assert fit.scale == pytest.approx(0.01, rel=1e-4) and fit.target == pytest.approx(0.01 * 0.9, rel=1e-4)
    assert fit.shift == pytest.approx(0.01 * 0.1, rel=1e-3)
    all_positions = CEContract(vocab_size=512, z_loss=0.01, z_loss_positions="all")
    assert fit_signatures(hidden, weight, targets, grad, grad, ref.token_weight, all_positions) is None


def test_the_fit_emulates_pytorchs_native_path_with_the_multiplier():
    gen = torch.Generator().manual_seed(3)
    n, d, v = 1024, 64, 8192
    hidden = torch.randn(n, d, generator=gen).bfloat16()
    weight = (torch.randn(v, d, generator=gen) * (6 / d ** 0.5)).bfloat16()
    targets = torch.randint(0, v, (n,), generator=gen)
    contract = CEContract(vocab_size=v, logit_multiplier=0.3)
    h = hidden.detach().requires_grad_()
    F.cross_entropy((F.linear(h, weight) * 0.3).float(), targets).backward()
    ref = reference_linear_cross_entropy(hidden, weight, targets, contract)
    fit = fit_signatures(hidden, weight, targets, h.grad, ref.grad_hidden, ref.token_weight, contract)
    assert fit.softmax_spread == pytest.approx(1.0, abs=0.05) and fit.sigmas("scale") < 5


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_the_fused_layer_keeps_the_multiplier(reduction):
    hidden, weight, targets = inputs(n=64, d=32, v=300)
    contract = CEContract(vocab_size=300, reduction=reduction, logit_multiplier=0.3, softcap=5.0, label_smoothing=0.1,
                          z_loss=1e-3)
    layer = FusedLinearCrossEntropy(32, contract, weight=torch.nn.Parameter(weight.clone()), token_chunk=16)
    h = hidden.clone().requires_grad_()
    loss = layer(h, targets)
    upstream = torch.rand(loss.shape) + 0.5
    loss.backward(upstream)
    ref = reference_linear_cross_entropy(hidden, weight, targets, contract, grad_output=upstream)
    assert float((loss.detach().double() - ref.loss.double()).abs().max()) < 1e-5
    assert rel(h.grad, ref.grad_hidden.double()) < 1e-5 and rel(layer.weight.grad, ref.grad_weight.double()) < 1e-5


def test_the_faulty_layer_keeps_the_multiplier_and_breaks_only_its_fault():
    hidden, weight, targets = inputs(n=64, d=32, v=300)
    contract = CEContract(vocab_size=300, logit_multiplier=0.3)
    layer = FaultyFusedLinearCrossEntropy(32, contract, fault="grad_scale", weight=torch.nn.Parameter(weight.clone()))
    loss = layer(hidden, targets)
    ref = reference_linear_cross_entropy(hidden, weight, targets, contract, grad_output=None)
    assert float(loss.detach()) == pytest.approx(2 * float(ref.loss), rel=1e-5)


@pytest.mark.parametrize("options, message", [
    (dict(normalize_by="given_count"), "cannot keep normalize_by='given_count'"),
    (dict(z_loss=0.01, z_loss_positions="all"), "does not implement z_loss_positions='all'"),
    ({"l2_warp": 1e-4}, "has no L2-warp penalty"),
])
def test_the_fused_layer_refuses_what_it_does_not_implement(options, message):
    with pytest.raises(ValueError, match=message):
        FusedLinearCrossEntropy(16, CEContract(vocab_size=50, **options))


# -- transformers' own models: the reference against their loss and dL/dh ------------------------------------------

def _hf_seam(model, input_ids, labels, **kwargs):
    """out.loss and the decoder's output with its gradient, captured where the LM head reads it."""
    captured = {}

    def keep(module, args, output):
        output.last_hidden_state.retain_grad()
        captured["hidden"] = output.last_hidden_state

    hook = model.get_decoder().register_forward_hook(keep)
    try:
        out = model(input_ids=input_ids, labels=labels, use_cache=False, **kwargs)
    finally:
        hook.remove()
    out.loss.backward()
    return out.loss.detach(), captured["hidden"].detach(), captured["hidden"].grad


def _shifted(labels):
    return F.pad(labels, (0, 1), value=IGNORE)[..., 1:]  # as transformers' ForCausalLMLoss shifts them


def _tiny_batch(vocab):
    gen = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, vocab, (2, 24), generator=gen)
    labels = input_ids.clone()
    labels[0, :3] = IGNORE
    labels[1, 10:12] = IGNORE  # 5 of them; with the shift's padded last column, 7 rows ignored
    return input_ids, labels


@pytest.mark.parametrize("num_items", [None, 57])
@pytest.mark.parametrize("architecture, options", [
    ("bamba", {"z_loss": 0.01, "z_loss_positions": "all"}),  # z-loss over every row, ignored ones included
    ("falcon_h1", {"logit_multiplier": 0.5}),
])
def test_hf_loss_and_hidden_gradient_match_the_reference(architecture, options, num_items):
    pytest.importorskip("transformers")
    from ce_guard.demos.hf_models import tiny_causal_lm

    model = tiny_causal_lm(architecture, vocab=512).float()  # its head re-initialised N(0, 0.3)
    input_ids, labels = _tiny_batch(512)
    extra = {} if num_items is None else {"num_items_in_batch": torch.tensor(num_items)}
    loss, hidden, grad_hidden = _hf_seam(model, input_ids, labels, **extra)
    contract = CEContract(vocab_size=512, normalize_by="local_tokens" if num_items is None else "given_count",
                          **options)
    ref = reference_linear_cross_entropy(hidden, model.lm_head.weight.detach(), _shifted(labels), contract,
                                         given_count=num_items)
    assert abs(float(loss) - math.log(512)) > 0.5  # the re-initialised head: not the ~ln V of a fresh one
    assert float(ref.loss) == pytest.approx(float(loss), rel=2e-6)
    assert rel(ref.grad_hidden, grad_hidden.double()) < 2e-6
    ignored_rows_gradient = float(grad_hidden[_shifted(labels) == IGNORE].norm())
    # Only the z-loss over every row reaches the ignored rows.
    assert (ignored_rows_gradient > 0) == (options.get("z_loss_positions") == "all")


@pytest.mark.parametrize("positions, named", [("counted", "penalty_normalization/z_loss_over_all"),
                                              ("all", "within_budget/clean")])
def test_bambas_z_loss_over_every_row_is_named_as_such_under_a_per_token_contract(positions, named):
    """transformers 5.25's Bamba averages its z-loss over every row, ignored ones included. A user who declares the
    usual per-token z-loss is told that the penalty is normalised over another row set, not that padding leaks
    into the loss; declared as Bamba computes it (what the Hugging Face seam reads from its config), it is clean."""
    pytest.importorskip("transformers")
    from ce_guard.demos.hf_models import tiny_causal_lm

    model = tiny_causal_lm("bamba", vocab=512).float()
    input_ids, labels = _tiny_batch(512)
    loss, hidden, grad_hidden = _hf_seam(model, input_ids, labels)
    weight = model.lm_head.weight.detach()
    contract = CEContract(vocab_size=512, z_loss=model.config.z_loss_coefficient, z_loss_positions=positions)
    record = SeamRecord(hidden=hidden, weight=weight, targets=_shifted(labels), upstream=1.0,
                        fused=SeamOutputs(loss=loss, grad_hidden=grad_hidden, grad_weight=None))
    diagnosis = check_seam(record, contract).diagnosis
    assert diagnosis.variant == named, diagnosis.summary


# -- the CUDA paths: the reference's compiled blocks and fp16 operands, the fused layer's kernel gate ---------------

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("case", ["multiplier_softcap_smoothing_z_sum", "given_count_multiplier_softcap_smoothing_z",
                                  "z_all_given_count_multiplier", "z_all_sum_softcap_smoothing"])
def test_reference_on_cuda_matches_float64(case):
    options, truth = CASES[case]
    hidden, weight, targets = inputs(n=600, d=128, v=3001, dtype=torch.bfloat16)
    contract = CEContract(vocab_size=3001, **options)
    result = reference_linear_cross_entropy(hidden.cuda(), weight.cuda(), targets.cuda(), contract, grad_output=0.75,
                                            given_count=truth.get("given"), token_chunk=256,
                                            chunk_elements=256 * 1024)
    loss, grad_h, grad_w = first_principles(hidden, weight, targets, upstream=0.75, **truth)
    assert float(result.loss) == pytest.approx(float(loss), rel=1e-6)
    assert rel(result.grad_hidden.cpu(), grad_h) < 2.0 ** -11 and rel(result.grad_weight.cpu(), grad_w) < 2.0 ** -11


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_the_fused_layer_on_cuda_keeps_the_multiplier_on_the_torch_chunk_math():
    hidden, weight, targets = inputs(n=600, d=128, v=3001, dtype=torch.bfloat16)
    contract = CEContract(vocab_size=3001, logit_multiplier=0.3)
    layer = FusedLinearCrossEntropy(128, contract, weight=torch.nn.Parameter(weight.cuda()))
    h = hidden.cuda().requires_grad_()
    loss = layer(h, targets.cuda())
    loss.backward()
    fused = SeamOutputs(loss=loss.detach(), grad_hidden=h.grad, grad_weight=layer.weight.grad)
    record = SeamRecord(hidden=hidden.cuda(), weight=weight.cuda(), targets=targets.cuda(), fused=fused, upstream=1.0)
    assert check_seam(record, contract).diagnosis.cause == Cause.WITHIN_BUDGET


def test_the_kernel_gate_leaves_a_multiplier_to_the_torch_chunk_math():
    from ce_guard import fused_kernel
    from ce_guard.fused_chunk import ChunkMath

    assert fused_kernel.kernel_covers(ChunkMath.of(CEContract(vocab_size=50)), torch.bfloat16)
    assert not fused_kernel.kernel_covers(ChunkMath.of(CEContract(vocab_size=50, logit_multiplier=0.5)), torch.bfloat16)


def test_a_bundle_keeps_the_given_count_and_an_older_bundle_loads_without_one(tmp_path):
    from ce_guard.bundle import Bundle, load_bundle, save_bundle

    hidden, weight, targets = inputs(n=16, d=8, v=20)
    contract = CEContract(vocab_size=20, normalize_by="given_count")
    fused = _native_outputs(hidden, weight, targets, given=30.0)
    record = SeamRecord(hidden=hidden, weight=weight, targets=targets, fused=fused, upstream=1.0, given_count=30.0)
    result = check_seam(record, contract)
    bundle = Bundle(step=3, rank=0, contract=contract.to_dict(), record=record, report=result.report.to_dict(),
                    diagnosis=result.diagnosis.to_dict())
    path = save_bundle(tmp_path / "b.pt", bundle)
    assert load_bundle(path).record.given_count == 30.0
    raw = torch.load(path, weights_only=True)
    del raw["given_count"]
    torch.save(raw, path)
    assert load_bundle(path).record.given_count is None
