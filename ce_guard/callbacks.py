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
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn

from ce_guard import _dist
from ce_guard.agreement import Agreement, agree
from ce_guard.check import CheckResult, SeamRecord, check_seam
from ce_guard.contract import CEContract
from ce_guard.diagnosis import Cause, catalogue_entry, margins
from ce_guard.parity import SeamOutputs
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

    Under gradient accumulation each check records one micro-batch, a different position of the window each
    time (the checks' count modulo the window), so a fault in one micro-batch of k is met within k checks.

    Args:
        every_n_steps: check when ``trainer.global_step`` is a multiple of this (step 0 included).
        every_n_steps_while_drifting: under ``warn``, after a drift verdict check this often instead, until
            ``clean_checks_to_relax`` clean checks in a row; None keeps ``every_n_steps`` throughout.
        module_path: attribute path of the guarded module in the LightningModule (e.g. ``"model.output"``);
            by default the unique submodule with a ``ce_contract`` attribute.
        policy: on drift, ``warn`` (log and warn on rank zero), ``raise`` (:class:`SeamDriftError` on every
            rank) or ``stop`` (end the fit cleanly). A drift writes a repro bundle; one that goes on with
            the same cause keeps its first.
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
        every_n_steps_while_drifting: int | None = 1,
        clean_checks_to_relax: int = 3,
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
        if every_n_steps_while_drifting is not None and (
                not isinstance(every_n_steps_while_drifting, int) or every_n_steps_while_drifting < 1):
            raise ValueError("`every_n_steps_while_drifting` must be None or an int >= 1, got"
                             f" {every_n_steps_while_drifting!r}.")
        if not isinstance(clean_checks_to_relax, int) or clean_checks_to_relax < 1:
            raise ValueError(f"`clean_checks_to_relax` must be an int >= 1, got {clean_checks_to_relax!r}.")
        if policy not in POLICIES:
            raise ValueError(f"`policy` must be one of {POLICIES}, got {policy!r}.")
        if sample_tokens is not None and sample_tokens < 1:
            raise ValueError(f"`sample_tokens` must be None or >= 1, got {sample_tokens!r}.")
        self.every_n_steps = every_n_steps
        self.every_n_steps_while_drifting = every_n_steps_while_drifting
        self.clean_checks_to_relax = clean_checks_to_relax
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
        self.missed: list[dict[str, Any]] = []  # check steps whose check did not run: {"step", "reason"}
        self.clean_checks_owed: int | None = None  # clean checks still owed before the rate relaxes; None: relaxed
        self._requested_step = -1
        self._listeners: list[Callable[[pl.Trainer, int, dict[str, Any] | None, str], None]] = []
        self._module: nn.Module | None = None
        self._resolved_run_dir: str | None = None
        self._resumed = False
        self._recording: _Recording | None = None
        self._streak_bundle: str | None = None  # this rank's bundle of the drift going on, if any

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
        rank_zero_info(f"CEParityCallback: guarding `{type(self._module).__name__}` every {self.every_n_steps} steps"
                       f" under {contract}")

    # ------------------------------------------------------------------------------------ check steps
    def is_check_step(self, trainer: pl.Trainer) -> bool:
        """The same answer on every rank, from counters and agreed verdicts alone: no collective decides it."""
        step = trainer.global_step
        if self._module is None or step == self.last_checked_step:
            return False
        every = self.every_n_steps if self.clean_checks_owed is None else self.every_n_steps_while_drifting
        return step % every == 0 or step == self._requested_step

    def request_check(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch_idx: int) -> None:
        """Make the current optimizer step a check step. Every rank must ask alike: the check is collective."""
        self._requested_step = trainer.global_step
        self.on_train_batch_start(trainer, pl_module, None, batch_idx)

    def add_listener(self, listener: Callable[[pl.Trainer, int, dict[str, Any] | None, str], None]) -> None:
        """Call ``listener(trainer, step, verdict, reason)`` after each check: its history entry, or None and why
        it did not run. Adding one twice (a second fit) keeps one."""
        if listener not in self._listeners:
            self._listeners.append(listener)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._recording is None and self.is_check_step(trainer) and self._samples_micro_batch(trainer, batch_idx):
            # Look the module up again: a layer swapped or re-wrapped since fit start must stay guarded.
            self._module = find_guarded_module(pl_module, self.module_path)
            self._recording = _Recording(self._module, trainer.global_step)

    def _samples_micro_batch(self, trainer: pl.Trainer, batch_idx: int) -> bool:
        """Whether this micro-batch is the one this check records: position ``checks so far % window``."""
        k = trainer.accumulate_grad_batches
        if k == 1:
            return True
        start, total = batch_idx - batch_idx % k, trainer.num_training_batches
        window = k if not math.isfinite(total) else max(min(k, int(total) - start), 1)  # the epoch's last is short
        return batch_idx % k == len(self.history) % window

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
            reason = problem or "another rank could not record the seam"
            self._miss(trainer, recording.step, f"skipped: {reason}")
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
            self._miss(trainer, recording.step, f"failed: {error or 'on another rank'}")
            return None
        verdict = {"rank": trainer.global_rank, "cause": result.diagnosis.cause.value,
                   "drift": result.diagnosis.drift, "summary": result.diagnosis.summary}
        return _Outcome(record, result, agree(verdict, *_check_metrics(result), device=record.hidden.device))

    # ------------------------------------------------------------------------------------------ act
    def _act(self, trainer, pl_module, recording: "_Recording", outcome: "_Outcome", seconds: float) -> None:
        step, result, agreed = recording.step, outcome.result, outcome.agreement
        first, drifting = agreed.verdict, agreed.drifting_ranks > 0
        metrics = {f"{PREFIX}/{name}": value for name, value in agreed.metrics.items()}
        metrics.update({f"{PREFIX}/drift": float(drifting), f"{PREFIX}/check_seconds": seconds})
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
        entry = {"step": step, "drift": drifting, "cause": first["cause"], "summary": first["summary"],
                 "rank": first["rank"]}
        previous = self.history[-1] if self.history else None
        # A drift that goes on with the same cause (checked every step while it does) keeps its first bundle.
        repeat = drifting and previous is not None and previous["drift"] and previous["cause"] == first["cause"]
        self.history.append(entry)
        self._set_rate(drifting, step)
        self._notify(trainer, step, entry, "")

        if repeat and self._streak_bundle is not None:
            bundle = self._streak_bundle
        else:
            bundle = self._write_bundle(trainer, recording.module, outcome, step) if drifting else None
        self._streak_bundle = bundle
        if trainer.is_global_zero:
            receipt = {
                **entry, "epoch": trainer.current_epoch, "metrics": metrics, "ranks": agreed.ranks,
                "drifting_ranks": agreed.drifting_ranks,
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
        if repeat:
            rank_zero_info(f"CE seam still drifting at step {step}: {first['cause']} (bundle: {bundle}).")
            return
        rank_zero_warn(message)
        if self.policy == "stop":
            trainer.should_stop = True

    def _set_rate(self, drifting: bool, step: int) -> None:
        """Under ``warn``, check every ``every_n_steps_while_drifting`` steps from a drift verdict until
        ``clean_checks_to_relax`` clean checks in a row."""
        if self.policy != "warn" or self.every_n_steps_while_drifting is None:
            return
        if drifting:
            if self.clean_checks_owed is None:
                rank_zero_info(f"CEParityCallback: drift at step {step}: checking every"
                               f" {self.every_n_steps_while_drifting} steps until {self.clean_checks_to_relax} clean"
                               " checks in a row.")
            self.clean_checks_owed = self.clean_checks_to_relax
        elif self.clean_checks_owed is not None:
            self.clean_checks_owed -= 1
            if self.clean_checks_owed == 0:
                self.clean_checks_owed = None
                rank_zero_info(f"CEParityCallback: {self.clean_checks_to_relax} clean checks in a row by step {step}:"
                               f" back to every {self.every_n_steps} steps.")

    def _miss(self, trainer, step: int, reason: str) -> None:
        """A check step without a verdict: warned, kept in ``missed``, logged as ``ce_parity/missed`` (a gap
        in the panels has a reason), and told to listeners."""
        rank_zero_warn(f"CEParityCallback: the check at step {step} {reason}")
        self.missed.append({"step": step, "reason": reason})
        for logger in trainer.loggers:
            logger.log_metrics({f"{PREFIX}/missed": 1.0}, step=step)
        self._notify(trainer, step, None, reason)

    def _notify(self, trainer, step: int, entry: dict[str, Any] | None, reason: str) -> None:
        for listener in self._listeners:
            listener(trainer, step, entry, reason)

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
        return {"last_checked_step": self.last_checked_step, "history": [dict(h) for h in self.history],
                "missed": [dict(m) for m in self.missed], "clean_checks_owed": self.clean_checks_owed}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.last_checked_step = int(state_dict["last_checked_step"])
        self.history = [dict(h) for h in state_dict["history"]]
        self.missed = [dict(m) for m in state_dict.get("missed", [])]
        self.clean_checks_owed = state_dict.get("clean_checks_owed")
        self._resumed = True


def _check_metrics(result: CheckResult) -> tuple[dict[str, float | None], dict[str, float | None]]:
    """A check's numbers to average over ranks, and those whose worst rank is wanted (margins, max diffs)."""
    report = result.report
    means = {
        "loss_fused": report.loss_fused, "loss_ref": report.loss_ref, "loss_rel_err": report.loss_rel_err,
        "grad_hidden_norm_ratio": report.grad_hidden_norm_ratio, "grad_cosine": report.grad_hidden_cosine,
        "grad_hidden_rel_err": report.grad_hidden_rel_err, "grad_weight_norm_ratio": report.grad_weight_norm_ratio,
        "grad_weight_rel_err": report.grad_weight_rel_err, "budget_loss_rel": report.budget.loss_rel,
        "budget_grad_hidden_rel": report.budget.grad_hidden_rel,
    }
    maxima = {"max_per_token_abs_diff": report.per_token_max_abs_diff,
              "max_grad_hidden_abs_diff": report.grad_hidden_max_abs_diff,
              **{f"margin_{name}": value for name, value in margins(report).items()}}
    return means, maxima


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
    agreement: Agreement


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


def _group_sizes(trainer: pl.Trainer, contract: CEContract) -> dict[str, int]:
    tp = _dist.group_size(contract.tp_group)
    sizes = {"TP": tp, "DP": _dist.group_size(contract.token_group) if contract.token_group is not None else (
        max(trainer.world_size // tp, 1)), "grad_accum": trainer.accumulate_grad_batches}
    if contract.sequence_parallel:
        sizes["SP"] = tp
    return sizes


class SeamHealthCallback(Callback):
    """Watch the loss and the gradient norm for spikes, and have the seam checked on the step after one.

    A spike is a value more than ``z_threshold`` standard deviations above a running (EMA) mean after
    ``warmup`` steps, or a non-finite one. Both values are ones every rank shares, the loss averaged over
    ranks and the global gradient norm, so every rank sees the same spike and asks for the same check: no
    rank waits on a collective another skips. The spike is attributed with that fresh check's verdict, not
    with one up to ``every_n_steps`` old.

    Ordinary steps do not synchronise the host: a step's two values are reduced and copied to host memory
    without blocking when its gradients are ready, and read at the start of the next step, by which time the
    device has long computed them (it is still busy with the optimizer step). With gradient clipping by norm,
    the norm clipping computes is the one watched; no second norm is taken.

    Args:
        z_threshold: standard deviations above the running mean that make a spike.
        decay: the running mean's and variance's EMA decay per step.
        warmup: steps observed before a spike can be called.
        check_on_spike: ask :class:`CEParityCallback` for a check on the step after a spike.
    """

    def __init__(self, *, z_threshold: float = 6.0, decay: float = 0.98, warmup: int = 20,
                 check_on_spike: bool = True) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"`decay` must be in (0, 1), got {decay!r}.")
        self.z_threshold, self.decay, self.warmup, self.check_on_spike = z_threshold, decay, warmup, check_on_spike
        self.stats = {"loss": _RunningMoments(), "grad_norm": _RunningMoments()}
        self.spikes: list[dict[str, Any]] = []
        self._parity: CEParityCallback | None = None
        self._unattributed: list[dict[str, Any]] = []  # spikes whose check has not reported yet
        self._loss_sum: torch.Tensor | None = None     # this step's micro-batch losses, on the device
        self._micro_batches = 0
        self._in_flight: _StepValues | None = None     # a finished step's values on their way to the host
        self._restore_clipping: Callable[[], None] | None = None  # set while clipping hands us its norm

    def on_fit_start(self, trainer, pl_module) -> None:
        found = [cb for cb in trainer.callbacks if isinstance(cb, CEParityCallback)]
        self._parity = found[0] if found else None
        if self._parity is None:
            rank_zero_warn("SeamHealthCallback: no CEParityCallback on the Trainer, so spikes cannot be attributed.")
        else:
            self._parity.add_listener(self._on_check)
        self._restore_clipping = _take_norm_from_clipping(trainer, lambda norm: self._send(trainer, norm))

    def teardown(self, trainer, pl_module, stage: str) -> None:
        if self._restore_clipping is not None:
            self._restore_clipping()
            self._restore_clipping = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._in_flight is not None:  # the first micro-batch of a new optimizer step
            values, self._in_flight = self._in_flight, None
            self._judge(trainer, pl_module, batch_idx, values)

    def on_before_backward(self, trainer, pl_module, loss: torch.Tensor) -> None:
        # Lightning hands automatic optimisation's loss over divided by the accumulation count; undo it.
        scale = trainer.accumulate_grad_batches if pl_module.automatic_optimization else 1
        loss = loss.detach().float() * scale
        self._loss_sum = loss if self._loss_sum is None else self._loss_sum + loss
        self._micro_batches += 1

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if self._restore_clipping is not None:
            return  # the norm arrives from clipping, after this hook (see _take_norm_from_clipping)
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        self._send(trainer, _total_grad_norm(grads) if grads else None)

    def on_train_end(self, trainer, pl_module) -> None:
        if self._in_flight is not None:
            values, self._in_flight = self._in_flight, None
            self._judge(trainer, pl_module, None, values)
        for spike in self._unattributed:
            self._attribute(trainer, spike, "training ended before a check could run")
        self._unattributed.clear()

    def _send(self, trainer, grad_norm: torch.Tensor | None) -> None:
        """Start this step's (mean loss, gradient norm) on its way to the host: one all-reduce, no wait."""
        device = grad_norm.device if grad_norm is not None else (
            self._loss_sum.device if self._loss_sum is not None else torch.device("cpu"))
        zero = torch.zeros((), dtype=torch.float64, device=device)
        loss = zero if self._loss_sum is None else self._loss_sum.to(device, torch.float64) / self._micro_batches
        norm = zero if grad_norm is None else grad_norm.to(device, torch.float64)
        # (loss, norm, ranks with a loss, ranks with a norm): the mean loss over ranks that have one; the norm
        # is already global, so the sum over ranks divided by their count is the norm again.
        values = torch.stack([loss, norm, zero + (self._loss_sum is not None), zero + (grad_norm is not None)])
        _dist.all_reduce(values, dist.ReduceOp.SUM, dist.group.WORLD)
        self._in_flight = _StepValues.start(trainer.global_step, values)
        self._loss_sum, self._micro_batches = None, 0

    def _judge(self, trainer, pl_module, batch_idx: int | None, values: "_StepValues") -> None:
        step, (loss, grad_norm, with_loss, with_norm) = values.step, values.read()
        observed = [(name, total / count) for name, total, count in (("loss", loss, with_loss),
                                                                      ("grad_norm", grad_norm, with_norm)) if count]
        spiked = [spike for name, value in observed if (spike := self._observe(name, value, step)) is not None]
        if not spiked:
            return
        for spike in spiked:
            self.spikes.append(spike)
            for logger in trainer.loggers:
                logger.log_metrics({f"ce_health/{spike['signal']}_spike": 1.0,
                                    f"ce_health/{spike['signal']}_z": spike["z"]}, step=step)
        if self._parity is None or not self.check_on_spike or batch_idx is None:
            reason = ("no CEParityCallback on the Trainer" if self._parity is None
                      else "check_on_spike is off" if not self.check_on_spike else "training ended")
            for spike in spiked:
                self._attribute(trainer, spike, reason)
            return
        self._unattributed.extend(spiked)
        self._parity.request_check(trainer, pl_module, batch_idx)

    def _observe(self, name: str, value: float, step: int) -> dict[str, Any] | None:
        moments = self.stats[name]
        z = moments.zscore(value)
        spike = moments.count >= self.warmup and (not math.isfinite(value) or z > self.z_threshold)
        moments.update(value, self.decay)
        return {"step": step, "signal": name, "value": value, "z": z, "attribution": None} if spike else None

    def _on_check(self, trainer, step: int, verdict: dict[str, Any] | None, reason: str) -> None:
        """The parity callback's report of a check: attribute every spike before it with this verdict."""
        due = [spike for spike in self._unattributed if spike["step"] < step]
        self._unattributed = [spike for spike in self._unattributed if spike["step"] >= step]
        for spike in due:
            self._attribute(trainer, spike, reason, check_step=step, verdict=verdict)

    def _attribute(self, trainer, spike: dict[str, Any], reason: str, *, check_step: int | None = None,
                   verdict: dict[str, Any] | None = None) -> None:
        head = f"{spike['signal']} spike at step {spike['step']} ({spike['value']:.4g}, z={spike['z']:.1f})"
        if verdict is None:
            spike["attribution"] = "unknown"
            text = (f"the seam check at step {check_step} did not run: {reason}" if check_step is not None
                    else f"not checked: {reason}")
        elif verdict["drift"]:
            spike["attribution"] = "seam"
            text = (f"the seam check at step {check_step}: drifting, {verdict['cause']}: {verdict['summary']}")
        else:
            spike["attribution"] = "elsewhere"
            text = f"the seam check at step {check_step}: clean: look elsewhere"
        for logger in trainer.loggers:
            logger.log_metrics({"ce_health/attributable_to_seam": float(spike["attribution"] == "seam")},
                               step=check_step if check_step is not None else spike["step"])
        rank_zero_warn(f"{head}; {text}.")

    def state_dict(self) -> dict[str, Any]:
        return {"stats": {k: dataclasses.asdict(v) for k, v in self.stats.items()}, "spikes": list(self.spikes)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.stats = {k: _RunningMoments(**v) for k, v in state_dict["stats"].items()}
        self.spikes = list(state_dict["spikes"])


@dataclasses.dataclass
class _StepValues:
    """One step's shared values, copied to host memory without blocking; read once the copy has landed."""

    step: int
    host: torch.Tensor
    landed: Any  # a CUDA event, or None when the values are on the host already

    @classmethod
    def start(cls, step: int, values: torch.Tensor) -> "_StepValues":
        if values.device.type != "cuda":
            return cls(step, values, None)
        host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
        host.copy_(values, non_blocking=True)
        landed = torch.cuda.Event()
        landed.record()
        return cls(step, host, landed)

    def read(self) -> list[float]:
        if self.landed is not None:
            self.landed.synchronize()  # long done by the next step's start: the optimizer step ran after it
        return self.host.tolist()


def _take_norm_from_clipping(trainer, take: Callable[[torch.Tensor], None]) -> Callable[[], None] | None:
    """With clipping by norm, have the precision plugin hand ``take`` the norm it computes; returns the undo.

    Lightning's ``Precision.clip_grad_by_norm`` calls ``torch.nn.utils.clip_grad_norm_`` and drops the result;
    this does the same and keeps it. None (nothing changed) without clipping by norm, or where the plugin
    clips its own way: the monitor then takes its own norm.
    """
    from lightning.pytorch.plugins.precision import Precision

    plugin = trainer.precision_plugin
    by_norm = bool(trainer.gradient_clip_val) and trainer.gradient_clip_algorithm in (None, "norm")
    if not by_norm or type(plugin).clip_grad_by_norm is not Precision.clip_grad_by_norm:
        return None

    def clip_grad_by_norm(optimizer, clip_val) -> None:
        norm = torch.nn.utils.clip_grad_norm_(plugin.main_params(optimizer), clip_val)
        full_tensor = getattr(norm, "full_tensor", None)
        take(full_tensor() if full_tensor is not None else norm)

    plugin.clip_grad_by_norm = clip_grad_by_norm
    return lambda: vars(plugin).pop("clip_grad_by_norm", None)


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
