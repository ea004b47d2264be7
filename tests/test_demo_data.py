"""Demo data: torch's headers found and tokenized faithfully, cached, split by file, batched and padded."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ce_guard.demos import data
from ce_guard.demos.data import IGNORE_INDEX, CppTokenDataModule, TokenWindows

BUDGET = 60_000  # tokens: a few dozen headers, well under a second to tokenize


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("ce_guard_cache")


@pytest.fixture(scope="module")
def corpus(cache_dir: Path) -> data.TokenCorpus:
    return data.load_corpus(BUDGET, cache_dir)


def test_headers_found_in_a_fixed_order() -> None:
    files = data.torch_headers()
    assert len(files) > 1000 and all(p.suffix == ".h" for p in files)
    assert files == data.torch_headers()
    assert files != sorted(files)  # hash order, so a token budget samples the whole tree


def test_vocab_size_is_padded_for_tp() -> None:
    n_vocab = data.tokenizer().n_vocab
    assert n_vocab == 100277  # cl100k_base
    assert data.padded_vocab_size() == 100352 and data.padded_vocab_size() % 128 == 0


def test_documents_decode_to_the_header_text(corpus: data.TokenCorpus) -> None:
    enc, root = data.tokenizer(), Path(torch.__file__).parent / "include"
    assert len(corpus.tokens) == corpus.offsets[-1] == BUDGET and corpus.tokens.dtype == torch.int32
    for i in range(len(corpus.files) - 1):  # the last one is cut at the budget
        doc = corpus.documents([i]).tolist()
        assert doc[-1] == enc.eot_token
        text = (root / corpus.files[i]).read_text(encoding="utf-8", errors="replace")
        assert enc.decode(doc[:-1]) == text


def test_second_load_reads_the_cache(cache_dir: Path, corpus: data.TokenCorpus, monkeypatch) -> None:
    path = data.cache_path(BUDGET, cache_dir)
    assert path.is_file() and torch.__version__ in path.name
    monkeypatch.setattr(data, "build_corpus", lambda *a, **k: pytest.fail("cache was not used"))
    again = data.load_corpus(BUDGET, cache_dir)
    assert torch.equal(again.tokens, corpus.tokens) and torch.equal(again.offsets, corpus.offsets)
    assert again.files == corpus.files


@pytest.mark.parametrize("val_fraction", [0.01, 0.1, 0.5])
def test_split_is_by_file(corpus: data.TokenCorpus, val_fraction: float) -> None:
    train, val = data.split_by_file(corpus, val_fraction)
    assert train and val and sorted(train + val) == list(range(len(corpus.files)))
    val_tokens = sum(len(corpus.documents([i])) for i in val)
    biggest = int(corpus.offsets.diff().max())
    assert val_fraction * BUDGET <= val_tokens < val_fraction * BUDGET + biggest  # whole files, just enough


def test_datamodule_batches(cache_dir: Path) -> None:
    dm = CppTokenDataModule(seq_len=47, batch_size=3, max_tokens=BUDGET, cache_dir=str(cache_dir))
    dm.prepare_data()
    dm.setup("fit")
    input_ids, targets = next(iter(dm.train_dataloader()))
    assert input_ids.shape == targets.shape == (3, 47) and input_ids.dtype == targets.dtype == torch.int64
    assert (targets != IGNORE_INDEX).all() and targets.max() < dm.vocab_size
    x, y = dm.val_set[0]
    torch.testing.assert_close(y[:-1], x[1:])  # next-token targets
    assert len(dm.train_set) * 47 > 10 * len(dm.val_set) * 47  # ~5% held out
    assert len(next(iter(dm.val_dataloader()))[0]) == 3


def test_padding_fraction_and_layout() -> None:
    tokens = torch.arange(100_001, dtype=torch.int32)
    windows = TokenWindows(tokens, seq_len=100, pad_fraction=0.2, pad_id=7, seed=0)
    rows = [windows[i] for i in range(len(windows))]
    targets = torch.stack([t for _, t in rows])  # (1000, 100)
    ignored = targets == IGNORE_INDEX
    assert abs(ignored.float().mean().item() - 0.2) < 0.01
    assert (~ignored[:, 0]).all()  # every row keeps a target
    for input_ids, row_targets in rows:
        pad = int((row_targets == IGNORE_INDEX).sum())
        assert (row_targets[: 100 - pad] != IGNORE_INDEX).all()  # right padding: one contiguous tail
        assert (input_ids[100 - pad:] == 7).all()
    again = TokenWindows(tokens, seq_len=100, pad_fraction=0.2, pad_id=7, seed=0)
    torch.testing.assert_close(windows.pad_lengths, again.pad_lengths)  # fixed by the seed


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"seq_len": 0}, "`seq_len`"),
    ({"val_fraction": 1.0}, "`val_fraction`"),
    ({"pad_fraction": 0.6}, "`pad_fraction`"),
    ({"num_workers": -1}, "`num_workers`"),
])
def test_bad_arguments_raise(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        CppTokenDataModule(**kwargs)


def test_too_small_split_raises(cache_dir: Path) -> None:
    dm = CppTokenDataModule(seq_len=4096, max_tokens=BUDGET, val_fraction=0.01, cache_dir=str(cache_dir))
    with pytest.raises(ValueError, match="validation split"):
        dm.setup("fit")
