"""The guard on a real third-party fused path: torch's chunked F.linear_cross_entropy with bf16 inputs.

On torch 2.13's CPU build the chunked path's bf16 loss is far off (9.6875 against a float64 11.0013 at
N=512, V=8192; its gradients are fine). This test does not pin that bug: whatever torch returns, a loss
more than 1% off must be flagged, and a correct one must pass.
"""

import pytest
import torch
import torch.nn.functional as F

from ce_guard import SeamOutputs, SeamRecord, check_seam

pytestmark = pytest.mark.skipif(not hasattr(F, "linear_cross_entropy"), reason="needs torch >= 2.13")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_guard_flags_torch_chunked_path_exactly_when_its_loss_is_off(dtype):
    from ce_guard.adapters import TorchLinearCrossEntropy

    torch.manual_seed(0)
    n, d, v = 512, 32, 8192
    hidden = torch.randn(n, d).to(dtype)
    weight = torch.nn.Parameter((torch.randn(v, d) / d ** 0.5 * 2).to(dtype))
    targets = torch.randint(0, v, (n,))
    layer = TorchLinearCrossEntropy(d, v, weight=weight)
    h = hidden.detach().requires_grad_()
    loss = layer(h, targets)
    loss.backward()
    exact = F.cross_entropy(hidden.double() @ weight.detach().double().T, targets)
    fused = SeamOutputs(loss=loss.detach().float(), grad_hidden=h.grad, grad_weight=weight.grad)
    result = check_seam(SeamRecord(hidden=hidden, weight=weight.detach(), targets=targets, fused=fused, upstream=1.0),
                        layer.ce_contract)
    off = abs(float(loss) / float(exact) - 1)
    assert result.diagnosis.drift == (off > 0.01), (off, result.diagnosis.summary)
    if off > 0.01:
        assert "only the loss is off" in result.diagnosis.summary
