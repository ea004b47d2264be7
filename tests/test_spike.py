"""The spike statistics without a Trainer: running moments, one step's shared values, the total gradient norm."""

import math

import pytest
import torch

from ce_guard.spike import RunningMoments, StepValues, total_grad_norm


def test_running_moments_track_an_ema_and_skip_non_finite_values():
    moments = RunningMoments()
    assert moments.zscore(5.0) == 0.0 and moments.zscore(math.nan) == math.inf
    for value in (1.0, 3.0, math.inf):
        moments.update(value, decay=0.5)
    assert (moments.mean, moments.var, moments.count) == (2.0, 1.0, 2)  # mean 1 + 0.5 * 2; var 0.5 * (0 + 0.5 * 4)
    assert moments.zscore(4.0) == pytest.approx(2.0)


def test_step_values_average_the_loss_over_micro_batches_and_leave_out_what_no_rank_had():
    values = StepValues.share(3, torch.tensor(6.0), 4, torch.tensor(0.5))
    assert values.step == 3 and values.landed is None  # on the host already: nothing to wait for
    assert values.means() == {"loss": 1.5, "grad_norm": 0.5}
    assert StepValues.share(4, None, 0, torch.tensor(2.0)).means() == {"grad_norm": 2.0}


def test_total_grad_norm_of_plain_tensors_is_their_joint_norm():
    grads = [torch.tensor([3.0, 0.0]), torch.tensor([[4.0]])]
    assert total_grad_norm(grads).item() == 5.0
