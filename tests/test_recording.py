"""SeamRecording without a Trainer: hooks on a plain module record one forward and its backward, then go."""

import pytest
import torch
from torch import nn

from ce_guard.check import check_seam
from ce_guard.contract import CEContract
from ce_guard.recording import SeamRecording


class PlainHead(nn.Module):
    """An unfused output layer with the seam's signature: ``(hidden, targets) -> mean loss``."""

    def __init__(self, hidden: int, vocab: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(vocab, hidden) * hidden ** -0.5)
        self.ce_contract = CEContract(vocab_size=vocab)

    def forward(self, hidden, targets):
        logits = hidden @ self.weight.T  # (N, V)
        return nn.functional.cross_entropy(logits.float(), targets, ignore_index=-100)


def test_records_one_forward_and_backward_and_removes_its_hooks():
    head, mix = PlainHead(8, 40), nn.Linear(8, 8)
    tokens = torch.randn(12, 8)
    targets = torch.randint(0, 40, (12,))
    targets[::4] = -100
    recording = SeamRecording(head)
    hidden = torch.tanh(mix(tokens))
    hidden.retain_grad()
    loss = head(hidden, targets)
    (3 * loss).backward()  # the upstream gradient the seam sees is 3
    head(hidden.detach(), targets)  # a later forward is not recorded
    recording.remove()

    assert recording.finished_forward and recording.problem() is None
    assert torch.equal(recording.hidden, hidden.detach()) and torch.equal(recording.targets, targets)
    assert torch.equal(recording.loss, loss.detach()) and torch.equal(recording.weight, head.weight.detach())
    assert recording.upstream.item() == 3.0
    assert torch.equal(recording.grad_hidden, hidden.grad)
    assert not head._forward_hooks and not head._forward_pre_hooks

    record = recording.to_record(replay_weight_grad=True)
    assert record.upstream == 3.0 and record.fused.loss.dtype == torch.float32
    torch.testing.assert_close(record.fused.grad_weight, head.weight.grad, rtol=0, atol=0)
    assert check_seam(record, head.ce_contract).diagnosis.variant == "within_budget/clean"


def test_a_recording_without_backward_names_the_problem():
    head = PlainHead(4, 10)
    recording = SeamRecording(head)
    assert recording.problem() == "the guarded module did not run on this micro-batch"
    with torch.no_grad():
        head(torch.randn(3, 4), torch.tensor([1, 2, 3]))
    recording.remove()
    assert "no backward reached the guarded module" in recording.problem()


@pytest.mark.parametrize("replay", [True, False])
def test_the_replay_leaves_training_grads_alone(replay):
    head = PlainHead(4, 10)
    hidden = torch.randn(5, 4, requires_grad=True)
    targets = torch.tensor([0, 1, 2, 3, 4])
    recording = SeamRecording(head)
    head(hidden, targets).backward()
    recording.remove()
    before = head.weight.grad.clone()
    record = recording.to_record(replay_weight_grad=replay)
    assert torch.equal(head.weight.grad, before) and (record.fused.grad_weight is not None) == replay
