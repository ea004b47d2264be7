"""A ``ce-guard parity`` config: a YAML file of shapes, dtype, contract, fused path and check settings, validated.

Every problem is a :class:`ConfigError` naming the file, the key, what was expected and what was found.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ce_guard.contract import CEContract
from ce_guard.testing import LAYER_FAULTS

FUSED_PATHS = ("ce_guard", "liger", "cce", "torch")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "float64": torch.float64}


class ConfigError(ValueError):
    """A parity config that cannot be read or does not validate."""


@dataclass(frozen=True, kw_only=True)
class FusedSpec:
    path: str = "ce_guard"              # ce_guard's layer, or a peer's adapter (ce_guard.adapters)
    fault: str | None = None            # ce_guard only: a deliberate seam fault (ce_guard.testing.LAYER_FAULTS)
    fault_scale: int = 2                # the k of the grad_scale fault
    token_chunk: int | None = None      # ce_guard only: tokens per chunk; None picks one


@dataclass(frozen=True, kw_only=True)
class ParityConfig:
    tokens: int                         # N, flattened batch x sequence
    hidden: int                         # D
    vocab: int                          # V
    seed: int = 0                       # inputs, weight and padding positions
    dtype: torch.dtype = torch.float32  # of hidden and weight: what the fused matmul consumes
    ignore_fraction: float = 0.1        # share of targets set to ignore_index, as padding would be
    contract: CEContract
    fused: FusedSpec
    group_sizes: dict[str, int]         # sizes a scale factor may be traced to (TP, SP, DP, grad_accum)
    budget_tokens: int = 256
    safety: float = 4.0


_TOP_KEYS = ("shapes", "dtype", "ignore_fraction", "contract", "fused", "group_sizes", "check")
_SHAPE_KEYS = ("tokens", "hidden", "vocab", "seed")
_CHECK_KEYS = ("budget_tokens", "safety")
# Process groups cannot come from a file; a one-process reproducer has none.
CONTRACT_KEYS = tuple(f for f in CEContract.__dataclass_fields__ if f not in ("token_group", "tp_group"))


def load_parity_config(path: str | Path) -> ParityConfig:
    """Read and validate a ``configs/parity/*.yaml`` file; every problem is a :class:`ConfigError`."""
    import yaml

    raw = _load_yaml(path, yaml)
    where = str(path)
    _only(raw, _TOP_KEYS, where)
    shapes = _section(raw, "shapes", where, required=True)
    _only(shapes, _SHAPE_KEYS, f"{where}: shapes")
    sizes = {k: _positive_int(shapes.get(k), f"{where}: shapes.{k}") for k in ("tokens", "hidden", "vocab")}
    seed = shapes.get("seed", 0)
    _expect(isinstance(seed, int) and not isinstance(seed, bool),
            f"{where}: shapes.seed must be an int, got {seed!r}.")
    dtype_name = raw.get("dtype", "float32")
    _expect(dtype_name in DTYPES, f"{where}: dtype must be one of {list(DTYPES)}, got {dtype_name!r}.")
    ignore_fraction = raw.get("ignore_fraction", 0.1)
    _expect(isinstance(ignore_fraction, (int, float)) and 0 <= ignore_fraction < 1,
            f"{where}: ignore_fraction must be a number in [0, 1), got {ignore_fraction!r}.")
    check = _section(raw, "check", where)
    _only(check, _CHECK_KEYS, f"{where}: check")
    group_sizes = _section(raw, "group_sizes", where)
    for name, size in group_sizes.items():
        _positive_int(size, f"{where}: group_sizes.{name}")
    safety = check.get("safety", 4.0)
    _expect(isinstance(safety, (int, float)) and safety > 0,
            f"{where}: check.safety must be a number > 0, got {safety!r}.")
    return ParityConfig(
        **sizes, seed=seed, dtype=DTYPES[dtype_name], ignore_fraction=float(ignore_fraction),
        contract=_contract(_section(raw, "contract", where), sizes["vocab"], f"{where}: contract"),
        fused=_fused_spec(_section(raw, "fused", where), f"{where}: fused"),
        group_sizes=dict(group_sizes),
        budget_tokens=_positive_int(check.get("budget_tokens", 256), f"{where}: check.budget_tokens"),
        safety=float(safety),
    )


def _load_yaml(path: str | Path, yaml) -> dict[str, Any]:
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except OSError as err:
        raise ConfigError(f"cannot read config {path}: {err.strerror or err}.") from err
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {' '.join(str(err).split())}") from err
    _expect(isinstance(raw, dict),
            f"{path}: expected a mapping of {list(_TOP_KEYS)}, got {type(raw).__name__}.")
    return raw


def _contract(fields: dict[str, Any], vocab: int, where: str) -> CEContract:
    _only(fields, CONTRACT_KEYS, where)
    fields = dict(fields)
    _expect(fields.setdefault("vocab_size", vocab) == vocab,
            f"{where}: vocab_size={fields['vocab_size']} contradicts shapes.vocab={vocab}; drop one of them.")
    if "accum_dtype" in fields:
        _expect(fields["accum_dtype"] in DTYPES,
                f"{where}: accum_dtype must be one of {list(DTYPES)}, got {fields['accum_dtype']!r}.")
        fields["accum_dtype"] = DTYPES[fields["accum_dtype"]]
    try:
        return CEContract(**fields)
    except ValueError as err:
        raise ConfigError(f"{where}: impossible contract: {err}") from err


def _fused_spec(fields: dict[str, Any], where: str) -> FusedSpec:
    _only(fields, tuple(FusedSpec.__dataclass_fields__), where)
    path = fields.get("path", "ce_guard")
    _expect(path in FUSED_PATHS, f"{where}: path must be one of {FUSED_PATHS}, got {path!r}.")
    fault = fields.get("fault")
    _expect(fault is None or fault in LAYER_FAULTS,
            f"{where}: fault must be null or one of {list(LAYER_FAULTS)}, got {fault!r}.")
    _expect(path == "ce_guard" or (fault is None and fields.get("token_chunk") is None),
            f"{where}: fault and token_chunk apply to the ce_guard path only, not {path!r}.")
    token_chunk = fields.get("token_chunk")
    return FusedSpec(
        path=path, fault=fault,
        fault_scale=_positive_int(fields.get("fault_scale", 2), f"{where}.fault_scale"),
        token_chunk=None if token_chunk is None else _positive_int(token_chunk, f"{where}.token_chunk"),
    )


def _section(raw: dict[str, Any], key: str, where: str, *, required: bool = False) -> dict[str, Any]:
    value = raw.get(key)
    _expect(value is not None or not required, f"{where}: missing required section `{key}`.")
    value = {} if value is None else value
    _expect(isinstance(value, dict), f"{where}: `{key}` must be a mapping, got {type(value).__name__}.")
    return value


def _only(mapping: Mapping[str, Any], allowed: tuple[str, ...], where: str) -> None:
    unknown = sorted(set(mapping) - set(allowed))
    _expect(not unknown, f"{where}: unknown keys {unknown}; expected some of {list(allowed)}.")


def _positive_int(value: Any, where: str) -> int:
    _expect(isinstance(value, int) and not isinstance(value, bool) and value > 0,
            f"{where} must be a positive int, got {value!r}.")
    return value


def _expect(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def make_inputs(config: ParityConfig,
                device: torch.device) -> tuple[torch.Tensor, nn.Parameter, torch.Tensor]:
    """Seeded hidden (N, D), weight (V, D) at the usual init scale, and targets with padding.

    Drawn on the CPU generator whatever the device, so a config gives the same inputs everywhere.
    """
    gen = torch.Generator().manual_seed(config.seed)
    hidden = torch.randn(config.tokens, config.hidden, generator=gen)                          # (N, D)
    weight = torch.randn(config.vocab, config.hidden, generator=gen) * config.hidden ** -0.5   # (V, D)
    targets = torch.randint(0, config.vocab, (config.tokens,), generator=gen)                 # (N,)
    padding = torch.rand(config.tokens, generator=gen) < config.ignore_fraction
    targets[padding] = config.contract.ignore_index
    weight = nn.Parameter(weight.to(device, config.dtype))
    return hidden.to(device, config.dtype), weight, targets.to(device)
