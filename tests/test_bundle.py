"""Repro bundles: what the callback saves is what replay loads; another schema version is refused by name."""

import pytest
import torch

from ce_guard.bundle import KEYS, OPTIONAL_KEYS, SCHEMA_VERSION, Bundle, BundleError, load_bundle, save_bundle
from ce_guard.check import SeamRecord, check_seam
from ce_guard.contract import CEContract
from ce_guard.parity import SeamOutputs


def _bundle(upstream) -> Bundle:
    """A check of made-up fused outputs; a per-token upstream gradient comes with reduction='none'."""
    per_token = isinstance(upstream, torch.Tensor)
    contract = CEContract(vocab_size=11, reduction="none" if per_token else "mean")
    hidden, weight = torch.randn(6, 4), torch.randn(11, 4)
    targets = torch.tensor([1, -100, 3, 10, 0, 2])
    loss = torch.rand(6) if per_token else torch.tensor(2.5)
    fused = SeamOutputs(loss=loss, grad_hidden=torch.randn(6, 4), grad_weight=None)
    record = SeamRecord(hidden=hidden, weight=weight, targets=targets, fused=fused, upstream=upstream)
    result = check_seam(record, contract)
    return Bundle(step=7, rank=1, contract=contract.to_dict(), record=record, report=result.report.to_dict(),
                  diagnosis=result.diagnosis.to_dict())


@pytest.mark.parametrize("upstream", [0.5, torch.full((6,), 0.25)], ids=["scalar", "per_token"])
def test_save_then_load_gives_the_same_bundle(tmp_path, upstream):
    saved = _bundle(upstream)
    path = save_bundle(tmp_path / "bundles" / "step00000007_rank1.pt", saved)
    loaded = load_bundle(path)
    assert (loaded.step, loaded.rank, loaded.contract) == (saved.step, saved.rank, saved.contract)
    assert loaded.diagnosis == saved.diagnosis and loaded.diagnosis["variant"] == saved.diagnosis["variant"]
    assert loaded.report.keys() == saved.report.keys()
    for name in ("hidden", "weight", "targets"):
        assert torch.equal(getattr(loaded.record, name), getattr(saved.record, name)), name
    assert torch.equal(loaded.record.fused.loss, saved.record.fused.loss)
    assert torch.equal(loaded.record.fused.grad_hidden, saved.record.fused.grad_hidden)
    assert loaded.record.fused.grad_weight is None
    if isinstance(upstream, float):
        assert loaded.record.upstream == upstream
    else:
        assert torch.equal(loaded.record.upstream, upstream)
    assert set(torch.load(path, weights_only=True)) == {"schema_version", *KEYS, *OPTIONAL_KEYS}
    assert loaded.record.given_count is None


def test_another_schema_version_is_refused_with_both_versions_named(tmp_path):
    path = save_bundle(tmp_path / "b.pt", _bundle(1.0))
    raw = torch.load(path, weights_only=True)
    torch.save({**raw, "schema_version": SCHEMA_VERSION + 1}, path)
    with pytest.raises(BundleError, match=f"bundle schema version {SCHEMA_VERSION + 1}; this ce_guard reads"
                                          f" version {SCHEMA_VERSION}. Replay it with the ce_guard version"):
        load_bundle(path)


def test_bad_files_are_bundle_errors(tmp_path):
    with pytest.raises(BundleError, match="does not exist"):
        load_bundle(tmp_path / "missing.pt")
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(BundleError, match="found a list, not a dict"):
        load_bundle(tmp_path / "list.pt")
    torch.save({"schema_version": SCHEMA_VERSION, "step": 0}, tmp_path / "partial.pt")
    with pytest.raises(BundleError, match="bundle lacks \\['rank', 'contract'"):
        load_bundle(tmp_path / "partial.pt")
