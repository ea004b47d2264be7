"""GPU-only checks, run on the device machine: the reference's tensor-core path and the fused Triton path."""

import pytest
import torch
import torch.nn.functional as F

from ce_guard import CEContract, SeamOutputs, SeamRecord, check_seam, reference_linear_cross_entropy
from ce_guard.fused import FusedLinearCrossEntropy

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backward_dtype, grad_tolerance", [(None, 2.0 ** -11), (torch.float32, 5e-6)])
@pytest.mark.parametrize("options", [{}, dict(label_smoothing=0.1, z_loss=1e-4, softcap=30.0)])
def test_reference_tensor_core_path_matches_float64(options, backward_dtype, grad_tolerance, dtype):
    """Exact logits on 16-bit tensor cores; the default fp16 backward within one fp16 rounding, fp32 exact."""
    torch.manual_seed(0)
    n, d, v = 1000, 256, 5003
    hidden = torch.randn(n, d).to(dtype)
    weight = (torch.randn(v, d) / d ** 0.5).to(dtype)
    targets = torch.randint(0, v, (n,))
    targets[::9] = -100
    contract = CEContract(vocab_size=v, **options)
    result = reference_linear_cross_entropy(hidden.cuda(), weight.cuda(), targets.cuda(), contract,
                                            token_chunk=256, chunk_elements=256 * 1024,
                                            backward_dtype=backward_dtype)
    h, w = hidden.double().requires_grad_(), weight.double().requires_grad_()
    z = h @ w.T
    if contract.softcap:
        z = contract.softcap * torch.tanh(z / contract.softcap)
    per_token = F.cross_entropy(z, targets, reduction="none", label_smoothing=contract.label_smoothing)
    per_token = per_token + contract.z_loss * torch.logsumexp(z, 1).square() * (targets != -100)
    loss = per_token.sum() / (targets != -100).sum()
    loss.backward()
    rel = lambda a, b: float((a.double().cpu() - b).norm() / b.norm())  # noqa: E731
    assert abs(float(result.loss) - float(loss)) / float(loss) < 1e-6
    assert rel(result.grad_hidden, h.grad) < grad_tolerance and rel(result.grad_weight, w.grad) < grad_tolerance


def test_fused_cuda_path_is_within_budget_under_the_guard():
    torch.manual_seed(0)
    n, d, v = 4096, 512, 32000
    hidden = torch.randn(n, d, device="cuda").bfloat16()
    weight = torch.nn.Parameter((torch.randn(v, d, device="cuda") / d ** 0.5).bfloat16())
    targets = torch.randint(0, v, (n,), device="cuda")
    targets[::17] = -100
    layer = FusedLinearCrossEntropy(d, CEContract(vocab_size=v), weight=weight)
    h = hidden.detach().requires_grad_()
    loss = layer(h, targets)
    loss.backward()
    fused = SeamOutputs(loss=loss.detach(), grad_hidden=h.grad, grad_weight=weight.grad)
    result = check_seam(SeamRecord(hidden=hidden, weight=weight.detach(), targets=targets, fused=fused, upstream=1.0),
                        layer.ce_contract)
    assert result.diagnosis.cause.value == "within_budget", result.diagnosis.summary


@pytest.mark.parametrize("upstream", [1.0, 0.25])
def test_fused_cuda_weight_grad_is_the_fp32_accumulator_rounded_once(upstream):
    """The backward's hand-over (a Triton cast on CUDA) gives torch's bits: fp32 dW times upstream, one rounding."""
    torch.manual_seed(0)
    n, d, v = 2048, 256, 32000
    hidden = torch.randn(n, d, device="cuda").bfloat16().requires_grad_()
    weight = torch.nn.Parameter((torch.randn(v, d, device="cuda") / d ** 0.5).bfloat16())
    targets = torch.randint(0, v, (n,), device="cuda")
    layer = FusedLinearCrossEntropy(d, CEContract(vocab_size=v), weight=weight)
    loss = layer(hidden, targets)
    _, saved_weight_grad = loss.grad_fn.saved_tensors  # the fp32 accumulator, for an upstream gradient of 1
    grad_weight, = torch.autograd.grad(loss, weight, torch.tensor(upstream, device="cuda"))
    assert saved_weight_grad.dtype == torch.float32
    assert torch.equal(grad_weight, (saved_weight_grad * upstream).bfloat16())
