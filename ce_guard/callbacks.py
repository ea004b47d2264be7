"""Lightning callbacks: shadow-run the reference beside the real fused output layer, and attribute spikes.

The callbacks only adapt Trainer hooks to :func:`ce_guard.check.check_seam`; the math lives in the core.
On a check step the parity callback hooks the guarded module for one micro-batch, records what training
actually used (hidden states, targets, the fused loss, the weight slice, the upstream gradient and
dL/dhidden from the real backward), then compares and decides together with every rank. Other steps pay
one integer modulo: no hooks, no host synchronisation.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn
from torchmetrics import MaxMetric, MeanMetric

from ce_guard import _dist
from ce_guard.check import CheckResult, SeamRecord, check_seam
from ce_guard.contract import CEContract
from ce_guard.diagnose import Cause, catalogue_entry
from ce_guard.parity import SeamOutputs, margins
from ce_guard.receipt import append_receipt, drop_receipts_after
from ce_guard.reference import reduction_plan
from ce_guard.wandb_panels import WandbPanels

Policy = Literal["warn", "raise", "stop"]
POLICIES = ("warn", "raise", "stop")
PREFIX = "ce_parity"


class SeamDriftError(RuntimeError):
    """The fused output layer broke its declared contract (raised on every rank under ``policy='raise'``)."""

    def __init__(self, step: int, rank: int, cause: str, summary: str) -> None:
        super().__init__(f"CE seam drift at step {step} (rank {rank}): {cause}: {summary}")
        self.step, self.rank, self.cause, self.summary = step, rank, cause, summary


class CEParityCallback(Callback):
    """Every ``every_n_steps`` optimizer steps, hold the fused output layer to its declared ``CEContract``.

    Args:
        every_n_steps: check when ``trainer.global_step`` is a multiple of this (step 0 included).
        module_path: attribute path of the guarded module in the LightningModule (e.g. ``"model.output"``);
            by default the unique submodule with a ``ce_contract`` attribute.
        policy: on drift, ``warn`` (log and warn on rank zero), ``raise`` (:class:`SeamDriftError` on every
            rank) or ``stop`` (end the fit cleanly). Every drift also writes a repro bundle.
        sample_tokens: compare dL/dh on this many tokens only (dL/dW skipped); the loss and the token count
            still see every token.
        replay_weight_grad: replay the fused module standalone on the recorded inputs to compare dL/dW
            (skipped where the weight is a sharded DTensor: replaying would run FSDP's hooks).
        budget_tokens: tokens the native error budget is measured on; ``safety`` multiplies it.
        run_dir: where receipts and bundles go; defaults to the logger's ``trainer.log_dir``, else the
            Trainer's ``default_root_dir``.
        group_sizes: extra sizes a scale factor may be traced to; TP, SP, DP and grad_accum are filled in.

    Example:
        >>> trainer = Trainer(callbacks=[CEParityCallback(every_n_steps=100)])
    """

    def __init__(
        self,
        every_n_steps: int = 100,
        *,
        module_path: str | None = None,
        policy: Policy = "warn",
        sample_tokens: int | None = None,
        replay_weight_grad: bool = True,
        budget_tokens: int = 256,
        safety: float = 4.0,
        run_dir: str | None = None,
        group_sizes: Mapping[str, int] | None = None,
    ) -> None:
        if not isinstance(every_n_steps, int) or every_n_steps < 1:
            raise ValueError(f"`every_n_steps` must be an int >= 1, got {every_n_steps!r}.")
        if policy not in POLICIES:
            raise ValueError(f"`policy` must be one of {POLICIES}, got {policy!r}.")
        if sample_tokens is not None and sample_tokens < 1:
            raise ValueError(f"`sample_tokens` must be None or >= 1, got {sample_tokens!r}.")
        self.every_n_steps = every_n_steps
        self.module_path = module_path
        self.policy = policy
        self.sample_tokens = sample_tokens
        self.replay_weight_grad = replay_weight_grad
        self.budget_tokens = budget_tokens
        self.safety = safety
        self.run_dir = run_dir
        self.extra_group_sizes = dict(group_sizes or {})
        # Rank-invariant state (Lightning checkpoints callbacks from rank zero only).
        self.last_checked_step = -1
        self.history: list[dict[str, Any]] = []
        self._module: nn.Module | None = None
        self._resolved_run_dir: str | None = None
        self._resumed = False
        self._recording: _Recording | None = None
        self._metrics: dict[str, MeanMetric | MaxMetric] = {}

    # ----------------------------------------------------------------------------------------- set-up
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._panels = WandbPanels(trainer)  # no-op without a WandbLogger
        try:
            self._module = find_guarded_module(pl_module, self.module_path)
        except ValueError as err:
            if self.policy != "warn":
                raise
            rank_zero_warn(f"{err} CEParityCallback is disabled for this fit.")
            self._module = None
            return
        if self._resumed and trainer.is_global_zero:
            dropped = drop_receipts_after(self._receipts_path(trainer), self.last_checked_step)
            if dropped:
                rank_zero_info(f"CEParityCallback: resumed after step {self.last_checked_step}; dropped {dropped}"
                               " receipts of steps that run again.")
        if not trainer.loggers:
            rank_zero_warn("CEParityCallback: the Trainer has no logger, so parity metrics go to the receipts"
                           f" file only ({self._receipts_path(trainer)}). Add a logger (e.g. WandbLogger) for panels.")
        if pl_module.automatic_optimization is False:
            rank_zero_info("CEParityCallback: manual optimisation: checking the first backward after each"
                           " check step's first forward of the guarded module.")
        contract: CEContract = self._module.ce_contract
        dp_group = contract.token_group or _data_parallel_group(trainer, contract)
        self._metrics = {name: (MaxMetric if name.startswith(_WORST_OF_RANKS) else MeanMetric)(
            nan_strategy="disable", process_group=dp_group, sync_on_compute=True).to(pl_module.device)
            for name in _AGGREGATED}
        rank_zero_info(f"CEParityCallback: guarding `{type(self._module).__name__}` every {self.every_n_steps} steps"
                       f" under {contract}")

    # ------------------------------------------------------------------------------------ check steps
    def is_check_step(self, trainer: pl.Trainer) -> bool:
        """The same answer on every rank, from counters alone: no collective decides it."""
        step = trainer.global_step
        return self._module is not None and step % self.every_n_steps == 0 and step != self.last_checked_step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._recording is None and self.is_check_step(trainer):
            # Look the module up again: a layer swapped or re-wrapped since fit start must stay guarded.
            self._module = find_guarded_module(pl_module, self.module_path)
            self._recording = _Recording(self._module, trainer.global_step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        recording = self._recording
        if recording is None or not recording.finished_forward:
            return
        self._recording = None
        recording.remove()
        self.last_checked_step = recording.step
        started = time.perf_counter()
        outcome = self._run_check(trainer, recording)
        if outcome is not None:
            self._act(trainer, pl_module, recording, outcome, time.perf_counter() - started)

    def on_train_end(self, trainer, pl_module) -> None:
        if self._recording is not None:
            self._recording.remove()
            self._recording = None

    def _run_check(self, trainer: pl.Trainer, recording: "_Recording") -> "_Outcome | None":
        contract: CEContract = recording.module.ce_contract
        problem = recording.problem()
        # Agree before any collective: if one rank cannot check, none does (no rank waits for another).
        if _any_rank(trainer, problem is not None):
            rank_zero_warn(f"CEParityCallback: skipped the check at step {recording.step}:"
                           f" {problem or 'another rank could not record the seam'}.")
            return None
        sizes = {**_group_sizes(trainer, contract), **self.extra_group_sizes}
        try:
            record = recording.to_record(self.replay_weight_grad)
            result = check_seam(record, contract, group_sizes=sizes, sample_tokens=self.sample_tokens,
                                budget_tokens=self.budget_tokens, safety=self.safety)
            error = None
        except Exception as err:  # noqa: BLE001 - under `warn` a failed check must never end training
            if self.policy != "warn":
                raise
            result, error = None, f"{type(err).__name__}: {err}"
        if _any_rank(trainer, error is not None):
            rank_zero_warn(f"CEParityCallback: the check at step {recording.step} failed: {error or 'on another rank'}")
            return None
        return _Outcome(record, result, _gather_verdicts(trainer, result))

    # ------------------------------------------------------------------------------------------ act
    def _act(self, trainer, pl_module, recording: "_Recording", outcome: "_Outcome", seconds: float) -> None:
        step, result, verdicts = recording.step, outcome.result, outcome.verdicts
        drifting = [v for v in verdicts if v["drift"]]
        first = drifting[0] if drifting else verdicts[0]
        metrics = self._aggregate(result)
        metrics.update({f"{PREFIX}/drift": float(bool(drifting)), f"{PREFIX}/check_seconds": seconds})
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
        entry = {"step": step, "drift": bool(drifting), "cause": first["cause"], "summary": first["summary"],
                 "rank": first["rank"]}
        self.history.append(entry)

        bundle = self._write_bundle(trainer, recording.module, outcome, step) if drifting else None
        if trainer.is_global_zero:
            receipt = {
                **entry, "epoch": trainer.current_epoch, "metrics": metrics, "verdicts": verdicts,
                "report": result.report.to_dict(), "sampled_tokens": result.sampled_tokens,
                "seam": reduction_plan(recording.module.ce_contract), "bundle": bundle,
            }
            append_receipt(self._receipts_path(trainer), receipt)
            self._panels.log_check(receipt)
        if not drifting:
            return
        catalogue = catalogue_entry(Cause(first["cause"]))
        message = (f"CE seam drift at step {step} (rank {first['rank']}): {first['cause']}: {first['summary']}."
                   f"{f' See {catalogue}.' if catalogue else ''} Repro bundle: {bundle}")
        if self.policy == "raise":
            raise SeamDriftError(step, first["rank"], first["cause"], first["summary"])
        rank_zero_warn(message)
        if self.policy == "stop":
            trainer.should_stop = True

    def _aggregate(self, result: CheckResult) -> dict[str, float]:
        """Mean (and max) of this check's numbers over the data-parallel group; NaN stays NaN."""
        report = result.report
        values = {
            "loss_fused": report.loss_fused, "loss_ref": report.loss_ref, "loss_rel_err": report.loss_rel_err,
            "grad_hidden_norm_ratio": report.grad_hidden_norm_ratio, "grad_cosine": report.grad_hidden_cosine,
            "grad_hidden_rel_err": report.grad_hidden_rel_err, "grad_weight_norm_ratio": report.grad_weight_norm_ratio,
            "grad_weight_rel_err": report.grad_weight_rel_err, "max_per_token_abs_diff": report.per_token_max_abs_diff,
            "max_grad_hidden_abs_diff": report.grad_hidden_max_abs_diff, "budget_loss_rel": report.budget.loss_rel,
            "budget_grad_hidden_rel": report.budget.grad_hidden_rel,
            **{f"margin_{name}": value for name, value in margins(report).items()},
        }
        out = {}
        for name, metric in self._metrics.items():
            metric.reset()
            value = values[name]
            metric.update(torch.tensor(math.nan if value is None else value, dtype=torch.float32))
            aggregated = float(metric.compute())
            if value is not None or not math.isnan(aggregated):
                out[f"{PREFIX}/{name}"] = aggregated
        return out

    def _write_bundle(self, trainer, module: nn.Module, outcome: "_Outcome", step: int) -> str:
        path = Path(self._run_dir(trainer)) / "ce_guard" / "bundles" / f"step{step:08d}_rank{trainer.global_rank}.pt"
        path.parent.mkdir(parents=True, exist_ok=True)
        record = outcome.record
        torch.save({
            "schema_version": 1, "step": step, "rank": trainer.global_rank,
            "contract": module.ce_contract.to_dict(),
            "hidden": record.hidden.cpu(), "weight": record.weight.cpu(), "targets": record.targets.cpu(),
            "fused_loss": record.fused.loss.cpu(),
            "fused_grad_hidden": None if record.fused.grad_hidden is None else record.fused.grad_hidden.cpu(),
            "fused_grad_weight": None if record.fused.grad_weight is None else record.fused.grad_weight.cpu(),
            "upstream": record.upstream.cpu() if isinstance(record.upstream, torch.Tensor) else record.upstream,
            "report": outcome.result.report.to_dict(), "diagnosis": outcome.result.diagnosis.to_dict(),
        }, path)
        return str(path)

    def _run_dir(self, trainer) -> str:
        return self._resolved_run_dir or self.run_dir or trainer.default_root_dir

    def _receipts_path(self, trainer) -> Path:
        return Path(self._run_dir(trainer)) / "ce_guard" / "receipts.jsonl"

    # ------------------------------------------------------------------------------------ state
    @property
    def last_verdict(self) -> dict[str, Any] | None:
        return self.history[-1] if self.history else None

    def state_dict(self) -> dict[str, Any]:
        return {"last_checked_step": self.last_checked_step, "history": [dict(h) for h in self.history]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.last_checked_step = int(state_dict["last_checked_step"])
        self.history = [dict(h) for h in state_dict["history"]]
        self._resumed = True


_AGGREGATED = ("loss_fused", "loss_ref", "loss_rel_err", "grad_hidden_norm_ratio", "grad_cosine",
               "grad_hidden_rel_err", "grad_weight_norm_ratio", "grad_weight_rel_err", "max_per_token_abs_diff",
               "max_grad_hidden_abs_diff", "budget_loss_rel", "budget_grad_hidden_rel", "margin_loss",
               "margin_grad_hidden", "margin_grad_weight")
_WORST_OF_RANKS = ("max_", "margin_")  # aggregated by MaxMetric: the worst rank's value, not the mean


def find_guarded_module(root: nn.Module, module_path: str | None = None) -> nn.Module:
    """The module whose seam is guarded: the one at ``module_path``, else the unique one with ``ce_contract``."""
    if module_path is not None:
        try:
            module = root.get_submodule(module_path)
        except AttributeError as err:
            raise ValueError(f"CEParityCallback: `module_path={module_path!r}` names no submodule ({err}).") from err
        if not isinstance(getattr(module, "ce_contract", None), CEContract):
            raise ValueError(f"CEParityCallback: `{module_path}` ({type(module).__name__}) declares no `ce_contract`;"
                             " wrap it in a ce_guard adapter or set `module.ce_contract = CEContract(...)`.")
        return module
    found = [(name, m) for name, m in root.named_modules() if isinstance(getattr(m, "ce_contract", None), CEContract)]
    if not found:
        raise ValueError("CEParityCallback found no module that declares a `ce_contract` (a CEContract). Use"
                         " ce_guard.fused.FusedLinearCrossEntropy or an adapter from ce_guard.adapters, or pass"
                         " `module_path=`.")
    if len(found) > 1:
        raise ValueError(f"CEParityCallback found several modules with a `ce_contract`: {[n for n, _ in found]};"
                         " pass `module_path=` to choose one.")
    return found[0][1]


class _Recording:
    """Hooks on the guarded module for one micro-batch: inputs, output, upstream gradient, dL/dhidden."""

    def __init__(self, module: nn.Module, step: int) -> None:
        self.module, self.step = module, step
        self.hidden = self.targets = self.weight = self.loss = None
        self.grad_hidden: torch.Tensor | None = None
        self.upstream: torch.Tensor | None = None
        self.autocast_dtype: torch.dtype | None = None
        self.finished_forward = False
        self._handles = [module.register_forward_pre_hook(self._pre_forward, with_kwargs=True),
                         module.register_forward_hook(self._post_forward, with_kwargs=True)]

    def _pre_forward(self, module, args, kwargs) -> None:
        if self.finished_forward:
            return
        # Clone now: FSDP frees the unsharded weight after forward.
        self.weight = _local_weight(module).detach().clone()

    def _post_forward(self, module, args, kwargs, output) -> None:
        if self.finished_forward:
            return
        hidden = args[0] if args else kwargs.get("hidden")
        targets = args[1] if len(args) > 1 else kwargs.get("targets")
        self.hidden, self.targets = hidden.detach(), targets.detach()
        self.loss = output.detach()
        device_type = hidden.device.type
        if torch.is_autocast_enabled(device_type):
            self.autocast_dtype = torch.get_autocast_dtype(device_type)
        if hidden.requires_grad:
            self._handles.append(hidden.register_hook(self._capture_grad_hidden))
        if output.requires_grad:
            self._handles.append(output.register_hook(self._capture_upstream))
        self.finished_forward = True

    def _capture_grad_hidden(self, grad: torch.Tensor) -> None:
        self.grad_hidden = grad.detach().clone()

    def _capture_upstream(self, grad: torch.Tensor) -> None:
        self.upstream = grad.detach().clone()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def problem(self) -> str | None:
        if self.hidden is None:
            return "the guarded module did not run on this micro-batch"
        if self.upstream is None or self.grad_hidden is None:
            return ("no backward reached the guarded module's output and input (was the fused loss part of the"
                    " returned loss, and does hidden require grad?)")
        return None

    def to_record(self, replay_weight_grad: bool) -> SeamRecord:
        grad_weight = _replay_weight_grad(self.module, self.hidden, self.weight, self.targets, self.upstream,
                                          self.autocast_dtype) if replay_weight_grad else None
        dtype = self.autocast_dtype or self.hidden.dtype  # what the fused matmul actually consumed
        upstream = self.upstream if self.upstream.numel() > 1 else float(self.upstream)
        fused = SeamOutputs(loss=self.loss.float(), grad_hidden=self.grad_hidden, grad_weight=grad_weight)
        return SeamRecord(hidden=self.hidden.to(dtype), weight=self.weight.to(dtype), targets=self.targets,
                          fused=fused, upstream=upstream)


@dataclasses.dataclass(frozen=True)
class _Outcome:
    record: SeamRecord
    result: CheckResult
    verdicts: list[dict[str, Any]]


def _local_weight(module: nn.Module) -> torch.Tensor:
    """This rank's weight slice as a plain tensor; a DTensor (fully_shard, parallelize_module) is gathered
    over its mesh, which costs nothing when it is already replicated."""
    weight = module.weight
    full_tensor = getattr(weight, "full_tensor", None)
    return full_tensor() if full_tensor is not None else weight


def _replay_weight_grad(module, hidden, weight, targets, upstream, autocast_dtype) -> torch.Tensor | None:
    """dL/dW of the fused module on the recorded inputs, by running its ``forward`` again on a weight copy.

    The module's own parameter is swapped for the copy for the duration, so training's ``.grad`` is untouched.
    ``forward`` is called directly: the recorded inputs are what the module's forward received, after any
    hooks (e.g. a sequence gather that ``parallelize_module`` put in front of it), so running the hooks again
    would transform them twice. Skipped (None) when the weight is a DTensor (FSDP-sharded).
    """
    if hasattr(module.weight, "placements"):
        return None
    original = module._parameters.get("weight")
    if original is None:
        return None
    replay = nn.Parameter(weight.clone())
    module._parameters["weight"] = replay
    try:
        with torch.enable_grad(), torch.autocast(hidden.device.type, dtype=autocast_dtype or torch.float32,
                                                 enabled=autocast_dtype is not None):
            loss = module.forward(hidden.detach(), targets)
            (grad_weight,) = torch.autograd.grad(loss, [replay], grad_outputs=upstream.to(loss.dtype).expand_as(loss))
    finally:
        module._parameters["weight"] = original
    return grad_weight


def _any_rank(trainer: pl.Trainer, flag: bool) -> bool:
    """One collective: True on every rank if ``flag`` is True on any rank."""
    return bool(trainer.strategy.reduce_boolean_decision(flag, all=False))


def _gather_verdicts(trainer: pl.Trainer, result: CheckResult) -> list[dict[str, Any]]:
    mine = {"rank": trainer.global_rank, "cause": result.diagnosis.cause.value, "drift": result.diagnosis.drift,
            "summary": result.diagnosis.summary}
    if not _dist.is_distributed() or dist.get_world_size() == 1:
        return [mine]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mine)
    return gathered


def _group_sizes(trainer: pl.Trainer, contract: CEContract) -> dict[str, int]:
    tp = _dist.group_size(contract.tp_group)
    sizes = {"TP": tp, "DP": _dist.group_size(contract.token_group) if contract.token_group is not None else (
        max(trainer.world_size // tp, 1)), "grad_accum": trainer.accumulate_grad_batches}
    if contract.sequence_parallel:
        sizes["SP"] = tp
    return sizes


def _data_parallel_group(trainer: pl.Trainer, contract: CEContract):
    """The group that sees different data: the mesh's data-parallel dim, else WORLD when there is no TP."""
    mesh = getattr(trainer.strategy, "device_mesh", None)
    if mesh is not None and "data_parallel" in (mesh.mesh_dim_names or ()):
        return mesh["data_parallel"].get_group()
    if _dist.group_size(contract.tp_group) > 1:
        rank_zero_warn("CEParityCallback: TP without a device mesh data-parallel dim: metrics are not averaged over"
                       " ranks (averaging over WORLD would double count TP replicas).")
        return None
    return None if not _dist.is_distributed() else dist.group.WORLD


class SeamHealthCallback(Callback):
    """Watch loss and gradient-norm spikes and say whether the seam was already drifting when one hit.

    A spike is a value more than ``z_threshold`` standard deviations above a running (EMA) mean, after
    ``warmup`` steps. The answer reads the parity callback's last verdict: drifting means the spike is
    attributable to the seam; clean means look elsewhere.
    """

    def __init__(self, *, z_threshold: float = 6.0, decay: float = 0.98, warmup: int = 20) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"`decay` must be in (0, 1), got {decay!r}.")
        self.z_threshold, self.decay, self.warmup = z_threshold, decay, warmup
        self.stats = {"loss": _RunningMoments(), "grad_norm": _RunningMoments()}
        self.spikes: list[dict[str, Any]] = []
        self._parity: CEParityCallback | None = None
        self._batch_step = 0

    def on_fit_start(self, trainer, pl_module) -> None:
        found = [cb for cb in trainer.callbacks if isinstance(cb, CEParityCallback)]
        self._parity = found[0] if found else None
        if self._parity is None:
            rank_zero_warn("SeamHealthCallback: no CEParityCallback on the Trainer, so spikes cannot be attributed.")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._batch_step = trainer.global_step  # the optimizer step this batch belongs to

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        if grads:
            self._observe(trainer, "grad_norm", float(_total_grad_norm(grads)), trainer.global_step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        if isinstance(loss, torch.Tensor):
            self._observe(trainer, "loss", float(loss.detach()) * trainer.accumulate_grad_batches, self._batch_step)

    def _observe(self, trainer, name: str, value: float, step: int) -> None:
        moments = self.stats[name]
        z = moments.zscore(value)
        if moments.count >= self.warmup and (not math.isfinite(value) or z > self.z_threshold):
            self._report(trainer, name, value, z, step)
        moments.update(value, self.decay)

    def _report(self, trainer, name: str, value: float, z: float, step: int) -> None:
        verdict = self._parity.last_verdict if self._parity else None
        if verdict is None:
            attribution, text = "unknown", "no parity check has run yet"
        elif verdict["drift"]:
            attribution = "seam"
            text = f"attributable: the seam was drifting at the last check (step {verdict['step']}: {verdict['cause']})"
        else:
            attribution = "elsewhere"
            text = f"parity was clean at the last check (step {verdict['step']}): look elsewhere"
        spike = {"step": step, "signal": name, "value": value, "z": z, "attribution": attribution}
        self.spikes.append(spike)
        for logger in trainer.loggers:
            logger.log_metrics({f"ce_health/{name}_spike": 1.0, f"ce_health/{name}_z": z,
                                "ce_health/attributable_to_seam": float(attribution == "seam")},
                               step=step)
        rank_zero_warn(f"{name} spike at step {step} ({value:.4g}, z={z:.1f}): {text}.")

    def state_dict(self) -> dict[str, Any]:
        return {"stats": {k: dataclasses.asdict(v) for k, v in self.stats.items()}, "spikes": list(self.spikes)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.stats = {k: _RunningMoments(**v) for k, v in state_dict["stats"].items()}
        self.spikes = list(state_dict["spikes"])


def _total_grad_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """The 2-norm of all gradients together: a sharded DTensor's over its whole mesh, a plain tensor as held here.

    Every step, so it stays cheap: squares are summed over local shards, grouped by (mesh, placements), with
    one all-reduce per sharded mesh dim and group, instead of a DTensor op and a collective per parameter
    (which cost a third of the throughput at TP=2 x DP=2, docs/benchmarks.md). A ``Partial`` gradient (not yet
    reduced) has no local norm to sum, so it is reduced on its own.
    """
    total = torch.zeros((), dtype=torch.float32, device=grads[0].device)
    local_groups: dict[Any, list[torch.Tensor]] = {}  # (mesh, placements), or None for plain tensors
    for grad in grads:
        grad = grad.detach()
        placements = getattr(grad, "placements", None)
        if placements is None:
            local_groups.setdefault(None, []).append(grad)
        elif any(p.is_partial() for p in placements):
            total += torch.linalg.vector_norm(grad.float()).full_tensor().square()
        else:
            local_groups.setdefault((grad.device_mesh, tuple(placements)), []).append(grad.to_local())
    for key, local in local_groups.items():
        squares = torch.nn.utils.get_total_norm(local, 2.0).float().square()
        if key is not None:
            mesh, placements = key
            for dim, placement in enumerate(placements):
                if placement.is_shard():
                    dist.all_reduce(squares, group=mesh.get_group(dim))
        total += squares.to(total.device)
    return total.sqrt()


@dataclasses.dataclass
class _RunningMoments:
    mean: float = 0.0
    var: float = 0.0
    count: int = 0

    def zscore(self, value: float) -> float:
        if self.count == 0 or not math.isfinite(value):
            return math.inf if not math.isfinite(value) else 0.0
        return (value - self.mean) / math.sqrt(self.var + 1e-12)

    def update(self, value: float, decay: float) -> None:
        if not math.isfinite(value):
            return
        if self.count == 0:
            self.mean, self.var = value, 0.0
        else:
            delta = value - self.mean
            self.mean += (1 - decay) * delta
            self.var = decay * (self.var + (1 - decay) * delta * delta)
        self.count += 1
