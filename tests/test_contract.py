import pytest
import torch

from ce_guard.contract import CEContract


def test_defaults_read_as_a_sentence():
    text = str(CEContract(vocab_size=32000, label_smoothing=0.1, z_loss=1e-4))
    assert text.startswith("CEContract(mean over this rank's non-ignored tokens")
    assert "label smoothing 0.1 over global V=32000" in text
    assert "z-loss 0.0001*lse^2" in text and "float32 accumulators" in text


def test_global_normalisation_sentence_names_the_owner():
    text = str(CEContract(vocab_size=10, normalize_by="global_tokens", grad_sync="sum"))
    assert "global non-ignored tokens summed over a token group of 1 (gradients summed over the group)" in text


def test_vocab_slice_sentence():
    c = CEContract(vocab_size=100, layout="[S,B,V/TP]", vocab_start=50, vocab_end=100)
    assert "vocab slice [50, 100)" in str(c) and c.vocab_slice_size == 50


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(vocab_size=0), "`vocab_size` must be a positive int"),
        (dict(vocab_size=10, reduction="avg"), "`reduction` must be one of"),
        (dict(vocab_size=10, normalize_by="everything"), "`normalize_by` must be one of"),
        (dict(vocab_size=10, reduction="sum", normalize_by="global_tokens"), "only applies to reduction='mean'"),
        (dict(vocab_size=10, ignore_index=3), "is a real class id"),
        (dict(vocab_size=10, label_smoothing=1.0), "`label_smoothing` must be in [0, 1)"),
        (dict(vocab_size=10, label_smoothing=float("nan")), "`label_smoothing` must be in [0, 1)"),
        (dict(vocab_size=10, z_loss=-1.0), "`z_loss` must be a finite number >= 0"),
        (dict(vocab_size=10, softcap=0.0), "`softcap` must be None or a finite number > 0"),
        (dict(vocab_size=10, accum_dtype=torch.int32), "`accum_dtype` must be one of"),
        (dict(vocab_size=10, layout="[B,S,V]"), "`layout` must be one of"),
        (dict(vocab_size=10, layout="[S,B,V/TP]", vocab_start=5, vocab_end=5), "must be non-empty"),
        (dict(vocab_size=10, vocab_start=0, vocab_end=5), "layout '[N,V]' holds the whole vocabulary"),
    ],
)
def test_invalid_contracts_name_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        CEContract(**kwargs)


def test_round_trip_through_a_record():
    c = CEContract(vocab_size=64, reduction="sum", label_smoothing=0.05, softcap=30.0, accum_dtype=torch.bfloat16,
                   layout="[S,B,V/TP]", vocab_start=32, vocab_end=64)
    record = c.to_dict()
    assert record["accum_dtype"] == "bfloat16" and record["tp_group_size"] == 1
    assert CEContract.from_dict(record) == c


def test_record_from_a_newer_version_is_refused():
    record = CEContract(vocab_size=8).to_dict() | {"temperature": 2.0}
    with pytest.raises(ValueError, match=r"unknown CEContract fields \['temperature'\]"):
        CEContract.from_dict(record)


def test_core_imports_neither_lightning_nor_wandb():
    import subprocess
    import sys

    code = "import sys, ce_guard; print('lightning' in sys.modules, 'wandb' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]
