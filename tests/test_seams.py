"""The three ways in, through a Trainer: a plain-head model guarded by one added line, refusals in one sentence,
hooks that fail becoming missed checks, and what a user without a logger sees."""

import logging

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning_helpers import receipts, token_loader, trainer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import ce_guard
from ce_guard.callbacks import CEParityCallback
from ce_guard.contract import CEContract
from ce_guard.seams import SeamRefused

VOCAB, HIDDEN = 96, 16


def cross_entropy(hidden, weight, targets):
    return F.cross_entropy(F.linear(hidden, weight).view(-1, VOCAB), targets.view(-1))


class PlainGPT(pl.LightningModule):
    """The model most people write: ``F.cross_entropy(self.lm_head(h).view(-1, V), y)`` in ``training_step``.
    ``declare`` adds the one line; ``loss_fn`` is what the line declares."""

    def __init__(self, declare: bool = True, loss_fn=cross_entropy, contract: CEContract | None = None) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, HIDDEN)
        self.mix = nn.Linear(HIDDEN, HIDDEN)
        self.lm_head = nn.Linear(HIDDEN, VOCAB, bias=False)
        self.declare, self.loss_fn = declare, loss_fn
        self.contract = contract or CEContract(vocab_size=VOCAB)

    def training_step(self, batch, batch_idx):
        tokens, targets = batch
        hidden = torch.tanh(self.mix(self.embed(tokens)))
        if not self.declare:
            return F.cross_entropy(self.lm_head(hidden).view(-1, VOCAB), targets.view(-1))
        return ce_guard.seam(hidden, self.lm_head.weight, targets, self.loss_fn, self.contract)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def test_one_added_line_guards_a_plain_head_with_dW_measured(tmp_path):
    parity = CEParityCallback(every_n_steps=1)
    t, _ = trainer(tmp_path, [parity], max_steps=6)
    t.fit(PlainGPT(), token_loader())
    assert [h["variant"] for h in parity.history] == ["within_budget/clean"] * 6 and not parity.missed
    ratios = [r["metrics"]["ce_parity/grad_weight_norm_ratio"] for r in receipts(tmp_path)]
    assert len(ratios) == 6 and all(abs(r - 1) < 1e-5 for r in ratios)  # the borrowed head's dL/dW, replayed


def test_the_declared_line_names_a_loss_that_counts_ignored_tokens(tmp_path):
    def counts_ignored(hidden, weight, targets):  # ignored targets still divide: sum over visible / all tokens
        per_token = F.cross_entropy(F.linear(hidden, weight).view(-1, VOCAB), targets.view(-1), reduction="none")
        return per_token.sum() / targets.numel()

    parity = CEParityCallback(every_n_steps=1)
    t, _ = trainer(tmp_path, [parity], max_steps=1)
    with pytest.warns(UserWarning, match="CE seam drift at step 0"):
        t.fit(PlainGPT(loss_fn=counts_ignored), token_loader())
    assert parity.history[0]["cause"] == "ignore_index_leak"


def test_a_plain_head_without_the_line_is_refused_in_one_sentence_and_training_goes_on(tmp_path):
    parity = CEParityCallback(every_n_steps=1)
    t, _ = trainer(tmp_path, [parity], max_steps=3)
    with pytest.warns(UserWarning, match=r"cannot guard this model.*no submodule declares `ce_contract`.*"
                                         r"`loss = ce_guard\.seam\(hidden, lm_head\.weight, targets, loss_fn"):
        t.fit(PlainGPT(declare=False), token_loader())
    assert t.global_step == 3 and parity.history == [] and parity.missed == []


def test_under_raise_the_refusal_is_an_error_at_the_first_step(tmp_path):
    t, _ = trainer(tmp_path, [CEParityCallback(every_n_steps=1, policy="raise")], max_steps=3)
    with pytest.raises(SeamRefused, match="cannot guard this model"):
        t.fit(PlainGPT(declare=False), token_loader())
    assert t.global_step == 1  # the first step is where a declared seam shows up or does not


def test_a_contract_on_a_head_that_takes_no_targets_is_refused_at_fit_start(tmp_path):
    """The warning used to say "set module.ce_contract"; doing so on the head crashed training at step 0."""
    model = PlainGPT(declare=False)
    model.lm_head.ce_contract = CEContract(vocab_size=VOCAB)
    parity = CEParityCallback(every_n_steps=1)
    t, _ = trainer(tmp_path, [parity], max_steps=2)
    with pytest.warns(UserWarning, match=r"`lm_head` \(Linear\) declares `ce_contract` but its forward does not take"):
        t.fit(model, token_loader())
    assert t.global_step == 2 and parity.history == []


def test_a_seam_hook_that_fails_is_a_missed_check_not_a_crash(tmp_path):
    """The declared function returns per-token losses while its contract says mean: the hook fails inside the
    forward, training is untouched, and the check step is kept as missed with the reason."""
    def per_token(hidden, weight, targets):
        return F.cross_entropy(F.linear(hidden, weight).view(-1, VOCAB), targets.view(-1), reduction="none")

    class PerTokenGPT(PlainGPT):
        def training_step(self, batch, batch_idx):
            return super().training_step(batch, batch_idx).mean()

    parity = CEParityCallback(every_n_steps=1)
    t, _ = trainer(tmp_path, [parity], max_steps=2)
    with pytest.warns(UserWarning, match="recording the seam failed"):
        t.fit(PerTokenGPT(loss_fn=per_token), token_loader())
    assert t.global_step == 2 and [m["step"] for m in parity.missed] == [0, 1]
    assert "the contract says reduction='mean', but the loss has shape (48,)" in parity.missed[0]["reason"]


def test_a_lasting_drift_is_told_once_in_full_then_every_so_often_with_its_count(tmp_path, caplog):
    def doubled(hidden, weight, targets):
        return 2 * cross_entropy(hidden, weight, targets)

    parity = CEParityCallback(every_n_steps=1, remind_every=10)
    t, _ = trainer(tmp_path, [parity], max_steps=25, logger=False)
    with caplog.at_level(logging.INFO), pytest.warns(UserWarning) as warned:
        t.fit(PlainGPT(loss_fn=doubled), token_loader(batches=25))
    assert len(parity.history) == 25 and all(h["drift"] for h in parity.history)
    assert sum("CE seam drift at step" in str(w.message) for w in warned) == 1
    reminders = [r.getMessage() for r in caplog.records if "still drifting" in r.getMessage()]
    assert [m.split(":")[0] for m in reminders] == ["CE seam still drifting at step 9", "CE seam still drifting at step 19"]
    assert "20 checks in a row" in reminders[1]
    summary = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("ce_guard: 25 checks"))
    assert "25 with drift, 0 missed" in summary and "first drift: step 0 (rank 0): normalization_scale" in summary
    assert f"ce-guard report {tmp_path}" in summary and "receipts.jsonl" in summary


# --- per-token losses, the masked mean taken outside the layer (docs/faults.md rows 16-17) ---------------------------


def per_token_cross_entropy(hidden, weight, targets):
    return F.cross_entropy(F.linear(hidden, weight).view(-1, VOCAB), targets.view(-1), reduction="none")


class _FirstTokenUpstream(torch.autograd.Function):
    """The per-token losses unchanged; backward hands every token the first token's upstream gradient, as
    Liger-Kernel's fused linear-CE up to 0.8.1 did (``grad_output[0]`` for every row)."""

    @staticmethod
    def forward(ctx, per_token):
        return per_token.view_as(per_token)

    @staticmethod
    def backward(ctx, grad):
        return grad.reshape(-1)[:1].expand_as(grad).clone()


def first_token_cross_entropy(hidden, weight, targets):
    return _FirstTokenUpstream.apply(per_token_cross_entropy(hidden, weight, targets))


class MaskedMeanGPT(PlainGPT):
    """Per-token losses from the declared line, and the masked mean taken outside it, as Megatron and RL losses do:
    ``(per_token * mask).sum() / mask.sum()`` with a float mask (per-token weights times the padding mask)."""

    def __init__(self, loss_fn=per_token_cross_entropy) -> None:
        super().__init__(loss_fn=loss_fn, contract=CEContract(vocab_size=VOCAB, reduction="none"))

    def training_step(self, batch, batch_idx):
        tokens, targets, mask = batch
        hidden = torch.tanh(self.mix(self.embed(tokens)))
        per_token = ce_guard.seam(hidden, self.lm_head.weight, targets, self.loss_fn, self.contract)  # (B*S,)
        mask = mask.reshape(-1)
        return (per_token * mask).sum() / mask.sum()


def weighted_loader(batches: int = 6, batch_size: int = 4, seq: int = 12, seed: int = 0) -> DataLoader:
    """Tokens, targets right-padded with ignore_index (the last 1-4 positions), and per-token weights uniform in
    [0, 2] times the padding mask: the first token is visible and its weight is not the others'."""
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (batches * batch_size, seq), generator=gen)
    targets = torch.randint(0, VOCAB, (batches * batch_size, seq), generator=gen)
    lengths = seq - torch.randint(1, 5, (batches * batch_size, 1), generator=gen)
    targets[torch.arange(seq) >= lengths] = -100
    mask = torch.rand(targets.shape, generator=gen) * 2 * (targets != -100)
    return DataLoader(TensorDataset(tokens, targets, mask), batch_size=batch_size)


def test_per_token_losses_with_the_masked_mean_outside_are_clean_at_every_check(tmp_path):
    parity = CEParityCallback(every_n_steps=1)
    t, _ = trainer(tmp_path, [parity], max_steps=4)
    t.fit(MaskedMeanGPT(), weighted_loader())
    assert [h["variant"] for h in parity.history] == ["within_budget/clean"] * 4 and not parity.missed
    reports = [r["report"] for r in receipts(tmp_path)]
    assert len(reports) == 4 and all(r["contract"]["reduction"] == "none" and r["upstream_fit"] is None
                                     for r in reports)


def test_a_head_that_applies_the_first_tokens_weight_to_all_is_named_at_the_first_check(tmp_path):
    parity = CEParityCallback(every_n_steps=1)
    t, _ = trainer(tmp_path, [parity], max_steps=1)
    with pytest.warns(UserWarning, match="CE seam drift at step 0 .*upstream_broadcast"):
        t.fit(MaskedMeanGPT(loss_fn=first_token_cross_entropy), weighted_loader())
    assert parity.history[0]["variant"] == "upstream_broadcast/first_token" and not parity.missed
    _, _, mask = next(iter(weighted_loader()))
    first = float(mask[0, 0] / mask.sum())  # dTotal/dloss_0 of the masked mean: the weight applied to all
    fit = receipts(tmp_path)[0]["report"]["upstream_fit"]
    assert abs(fit["first_weight"] - first) <= 1e-7 * first and abs(fit["applied_mean"] - first) < 1e-5 * first
    assert fit["first_residual"] < 1e-5 and fit["own_residual"] > 1.0 and fit["shape"] == "[4,12]"
