"""Recording a seam without a Trainer: hooks record one forward and its backward, then go; a failing hook
becomes a recording error, never an exception in the model."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ce_guard.check import check_seam
from ce_guard.contract import CEContract
from ce_guard.seams import ModuleSeam, SeamRefused


class PlainHead(nn.Module):
    """An unfused output layer with the seam's signature: ``(hidden, targets) -> mean loss``."""

    def __init__(self, hidden: int, vocab: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(vocab, hidden) * hidden ** -0.5)
        self.ce_contract = CEContract(vocab_size=vocab)

    def forward(self, hidden, targets):
        logits = hidden @ self.weight.T  # (N, V)
        return nn.functional.cross_entropy(logits.float(), targets, ignore_index=-100)


class BorrowingHead(nn.Module):
    """A wrapper that computes the loss through a borrowed ``nn.Linear``; ``how`` says how it shows the weight."""

    def __init__(self, hidden: int, vocab: int, how: str) -> None:
        super().__init__()
        self.lm_head = nn.Linear(hidden, vocab, bias=False)
        if how == "attribute":
            self.weight = self.lm_head.weight
        self.how = how
        self.ce_contract = CEContract(vocab_size=vocab)

    def __getattr__(self, name):
        if name == "weight" and self.__dict__.get("how") == "property":
            return self.lm_head.weight
        return super().__getattr__(name)

    def forward(self, hidden, targets):
        return F.cross_entropy(self.lm_head(hidden), targets)


def _run(head, hidden, targets, upstream=1.0):
    recording = ModuleSeam(head).record()
    (upstream * head(hidden, targets)).backward()
    recording.remove()
    return recording


def test_records_one_forward_and_backward_and_removes_its_hooks():
    head, mix = PlainHead(8, 40), nn.Linear(8, 8)
    tokens = torch.randn(12, 8)
    targets = torch.randint(0, 40, (12,))
    targets[::4] = -100
    recording = ModuleSeam(head).record()
    hidden = torch.tanh(mix(tokens))
    hidden.retain_grad()
    loss = head(hidden, targets)
    (3 * loss).backward()  # the upstream gradient the seam sees is 3
    head(hidden.detach(), targets)  # a later forward is not recorded
    recording.remove()

    assert recording.finished_forward and recording.problem() is None
    assert torch.equal(recording.hidden, hidden.detach()) and torch.equal(recording.targets, targets)
    assert torch.equal(recording.loss, loss.detach()) and torch.equal(recording.weight, head.weight.detach())
    assert recording.upstream.item() == 3.0 and recording.contract is head.ce_contract
    assert torch.equal(recording.grad_hidden, hidden.grad)
    assert not head._forward_hooks and not head._forward_pre_hooks

    record = recording.to_record(replay_weight_grad=True)
    assert record.upstream == 3.0 and record.fused.loss.dtype == torch.float32
    torch.testing.assert_close(record.fused.grad_weight, head.weight.grad, rtol=0, atol=0)
    assert check_seam(record, head.ce_contract).diagnosis.variant == "within_budget/clean"


def test_a_recording_without_backward_names_the_problem():
    head = PlainHead(4, 10)
    recording = ModuleSeam(head).record()
    assert recording.problem() == "the guarded seam did not run on this micro-batch"
    with torch.no_grad():
        head(torch.randn(3, 4), torch.tensor([1, 2, 3]))
    recording.remove()
    assert "no backward reached the seam's loss" in recording.problem()


@pytest.mark.parametrize("replay", [True, False])
def test_the_replay_leaves_training_grads_alone(replay):
    head = PlainHead(4, 10)
    recording = _run(head, torch.randn(5, 4, requires_grad=True), torch.tensor([0, 1, 2, 3, 4]))
    before = head.weight.grad.clone()
    record = recording.to_record(replay_weight_grad=replay)
    assert torch.equal(head.weight.grad, before) and (record.fused.grad_weight is not None) == replay


@pytest.mark.parametrize("how", ["attribute", "property", "found by shape"])
def test_a_borrowed_weight_is_found_and_its_gradient_measured(how):
    """``self.weight = self.lm_head.weight`` (a tie), a ``weight`` property, or no ``weight`` at all: dL/dW is
    replayed through the borrowed layer and equals the one training computed; training's grad is untouched."""
    torch.manual_seed(0)
    head = BorrowingHead(8, 24, how)
    recording = _run(head, torch.randn(10, 8, requires_grad=True), torch.randint(0, 24, (10,)), upstream=0.5)
    before = head.lm_head.weight.grad.clone()
    record = recording.to_record(replay_weight_grad=True)
    assert torch.equal(head.lm_head.weight.grad, before)
    torch.testing.assert_close(record.fused.grad_weight, before, rtol=1e-6, atol=0)
    assert check_seam(record, head.ce_contract).diagnosis.variant == "within_budget/clean"


def test_a_head_that_takes_no_targets_is_refused_with_the_line_that_fixes_it():
    linear = nn.Linear(8, 24, bias=False)
    linear.ce_contract = CEContract(vocab_size=24)
    with pytest.raises(SeamRefused, match=r"does not take the targets.*ce_guard\.seam\("):
        ModuleSeam(linear, "lm_head")


def test_a_head_without_a_weight_of_the_vocabulary_is_refused():
    class NoWeight(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(8, 8)
            self.ce_contract = CEContract(vocab_size=24)

        def forward(self, hidden, targets):
            return self.proj(hidden).sum()

    with pytest.raises(SeamRefused, match=r"no weight of the vocabulary slice's shape \(\[24, hidden\]\)"):
        ModuleSeam(NoWeight())


def test_a_hook_that_fails_becomes_a_recording_error_not_an_exception_in_training():
    """Declared mean but returns per-token losses: the post-forward hook's check fails; training goes on."""

    class PerToken(PlainHead):
        def forward(self, hidden, targets):
            return F.cross_entropy(hidden @ self.weight.T, targets, reduction="none")

    head = PerToken(4, 10)
    recording = ModuleSeam(head).record()
    losses = head(torch.randn(3, 4, requires_grad=True), torch.tensor([1, 2, 3]))
    losses.sum().backward()
    recording.remove()
    assert recording.problem().startswith("recording the seam failed (ValueError: the contract says reduction='mean'")
