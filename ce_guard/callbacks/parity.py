"""CEParityCallback: shadow-run the reference beside the real fused output layer on check steps.

On a check step the callback records the seam (:mod:`ce_guard.seams`) on one micro-batch and counts its window's
tokens; at the window's end it checks the seam and the weight its loss reached the optimizer with
(:func:`ce_guard.check.check_seam`), has every rank agree (:func:`ce_guard.agreement.agree`), then logs, writes
the receipt and, on drift, the repro bundle, and applies its policy. Other steps pay one integer modulo: no
hooks, no host synchronisation. At the end of fit rank zero prints what the guard saw (:mod:`ce_guard.fit_summary`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from ce_guard.agreement import Agreement, agree
from ce_guard.callbacks.loop import WindowSeen, group_sizes, samples_micro_batch, window_ends
from ce_guard.check import CheckResult, SeamRecord, check_seam, with_terms
from ce_guard.check_options import check_options
from ce_guard.check_rate import CheckRate
from ce_guard.contract import CEContract
from ce_guard.diagnosis import Thresholds
from ce_guard.drift import Policy, SeamDriftError, drift_warning
from ce_guard.evidence import check_receipt, write_bundle
from ce_guard.fit_summary import summary_lines
from ce_guard.metrics import check_metrics, metric_key
from ce_guard.receipt import append_receipt, drop_receipts_after
from ce_guard.recording import SeamRecording
from ce_guard.seams import DeclaredSeam, ModuleSeam, Seam, SeamRefused, find_seam, no_declared_call
from ce_guard.step_weight import TrainingContract, implied_training_contract
from ce_guard.wandb_panels import WandbPanels

Listener = Callable[[pl.Trainer, int, dict[str, Any] | None, str], None]  # (trainer, step, verdict, reason)


@dataclass(frozen=True)
class _Outcome:
    """A check every rank agreed on: the seam as recorded, this rank's result, and the agreement."""

    step: int
    contract: CEContract
    record: SeamRecord
    result: CheckResult
    agreement: Agreement


class CEParityCallback(Callback):
    """Every ``every_n_steps`` optimizer steps, hold the fused output layer to its declared ``CEContract``.

    Under gradient accumulation each check records one micro-batch, a different position of the window each
    time (the checks' count modulo the window), so a fault in one micro-batch of k is met within k checks; the
    window's other micro-batches are counted, so the recorded one's weight in the step can be held to
    ``training_contract``.

    Args:
        every_n_steps: check when ``trainer.global_step`` is a multiple of this (step 0 included).
        every_n_steps_while_drifting: under ``warn``, after a drift verdict check this often instead, until
            ``clean_checks_to_relax`` clean checks in a row; None keeps ``every_n_steps`` throughout.
        module_path: attribute path of the guarded module in the LightningModule (e.g. ``"model.output"``,
            or ``"model"`` for a Hugging Face causal LM); by default the one submodule with a ``ce_contract``,
            else the one Hugging Face causal LM, else the ``ce_guard.seam(...)`` call in the loss code.
        policy: on drift, ``warn`` (log and warn on rank zero), ``raise`` (:class:`SeamDriftError` on every
            rank) or ``stop`` (end the fit cleanly). A drift writes a repro bundle; one that goes on with
            the same cause keeps its first, and is reported in full once, then in one line every
            ``remind_every`` checks with its count.
        sample_tokens: compare dL/dh on this many tokens only (dL/dW skipped); the loss and the token count
            still see every token.
        replay_weight_grad: replay the fused module standalone on the recorded inputs to compare dL/dW
            (skipped where the weight is a sharded DTensor: replaying would run FSDP's hooks).
        budget_tokens: tokens the native error budget is measured on; ``safety`` multiplies it.
        run_dir: where receipts and bundles go; defaults to the Trainer's ``default_root_dir``.
        group_sizes: extra sizes a scale factor may be traced to; TP, SP, DP and grad_accum are filled in.
        thresholds: the cut-offs of the verdict and the diagnosis (:class:`ce_guard.Thresholds`); the
            calibrated defaults when None.
        training_contract: the weight each micro-batch's loss must carry in the optimizer step
            (:class:`ce_guard.TrainingContract`). ``auto``: the one the seam's contract implies, a mean of the
            window's micro-batch means (Lightning's divide) unless it normalizes over global tokens or a given
            count; a megatron-core model's own ``calculate_per_token_loss=True`` says ``global_tokens`` summed
            over data parallelism. Loss terms beside the seam (Megatron's MTP depths) are held to it too, each on
            its own counted tokens. None checks the seam alone (e.g. per-token weights of your own).

    Example:
        >>> trainer = Trainer(callbacks=[CEParityCallback(every_n_steps=100)])  # doctest: +SKIP
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
        thresholds: Thresholds | None = None,
        remind_every: int = 10,
        training_contract: TrainingContract | Literal["auto"] | None = "auto",
    ) -> None:
        check_options(policy=policy, thresholds=thresholds, training_contract=training_contract,
                      counts={"every_n_steps": every_n_steps, "remind_every": remind_every,
                              "clean_checks_to_relax": clean_checks_to_relax},
                      optional_counts={"every_n_steps_while_drifting": every_n_steps_while_drifting,
                                       "sample_tokens": sample_tokens})
        self.rate = CheckRate(every_n_steps, every_n_steps_while_drifting, clean_checks_to_relax)
        self.module_path = module_path
        self.policy = policy
        self.sample_tokens = sample_tokens
        self.replay_weight_grad = replay_weight_grad
        self.budget_tokens = budget_tokens
        self.safety = safety
        self.run_dir = run_dir
        self.extra_group_sizes = dict(group_sizes or {})
        self.thresholds = thresholds or Thresholds()
        self.remind_every = remind_every
        self.training_contract = training_contract
        # Rank-invariant state (Lightning checkpoints callbacks from rank zero only).
        self.last_checked_step = -1
        self.history: list[dict[str, Any]] = []
        self.missed: list[dict[str, Any]] = []  # check steps whose check did not run: {"step", "reason"}
        self._scheduled_step = -1
        self._listeners: list[Listener] = []
        self._seam: Seam | None = None
        self._resumed = False
        self._recording: SeamRecording | None = None
        self._recording_step = -1
        self._window = WindowSeen()
        self._streak_bundle: str | None = None  # this rank's bundle of the drift going on, if any
        self._streak = 0  # checks in a row with the drift going on

    # ----------------------------------------------------------------------------------------- set-up
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._panels = WandbPanels(trainer)  # no-op without a WandbLogger
        try:
            self._seam = find_seam(pl_module, self.module_path)
        except SeamRefused as err:
            self._refuse(str(err))
            return
        except Exception as err:  # under `warn` the guard never ends a fit it cannot start
            if self.policy != "warn":
                raise
            self._refuse(f"finding the seam failed ({type(err).__name__}: {err}).")
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
        contract = self._seam.contract
        rank_zero_info(f"CEParityCallback: guarding {self._seam.describe()} every {self.rate.every_n_steps} steps"
                       f"{f' under {contract}' if contract is not None else ''}")

    def _refuse(self, reason: str) -> None:
        """What cannot be guarded is refused in one sentence: a warning under ``warn``, else an error."""
        self._seam = None
        if self.policy != "warn":
            raise SeamRefused(f"CEParityCallback cannot guard this model: {reason}")
        rank_zero_warn(f"CEParityCallback cannot guard this model, so it is off for this fit: {reason}")

    # ------------------------------------------------------------------------------------ check steps
    def is_check_step(self, trainer: pl.Trainer) -> bool:
        """The same answer on every rank, from counters and agreed verdicts alone: no collective decides it."""
        step = trainer.global_step
        if self._seam is None or step == self.last_checked_step:
            return False
        return step % self.rate.every == 0 or step == self._scheduled_step

    def schedule_check(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch_idx: int) -> None:
        """Make the current optimizer step a check step, recording from micro-batch ``batch_idx`` if it is the
        one this check samples. Every rank must schedule alike: the check is collective."""
        self._scheduled_step = trainer.global_step
        self._start_recording(trainer, pl_module, batch_idx)

    def add_listener(self, listener: Listener) -> None:
        """Call ``listener(trainer, step, verdict, reason)`` after each check: its history entry, or None and why
        it did not run. Adding one twice (a second fit) keeps one."""
        if listener not in self._listeners:
            self._listeners.append(listener)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._start_recording(trainer, pl_module, batch_idx)

    def _start_recording(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch_idx: int) -> None:
        """Install the recording at a check step's first micro-batch and arm it on the one this check samples (on
        the first one seen, when the check was scheduled mid-window)."""
        if self._recording is None and self.is_check_step(trainer):
            if isinstance(self._seam, ModuleSeam):  # a layer swapped or re-wrapped since fit start stays guarded
                try:
                    self._seam = find_seam(pl_module, self.module_path)
                except Exception:  # keep the seam found at fit start; its recording will tell what is wrong
                    pass
            self._recording, self._recording_step = self._seam.record(), trainer.global_step
            self._window = WindowSeen(whole=batch_idx % trainer.accumulate_grad_batches == 0)
        if self._recording is not None:
            self._window.micro_batches += 1
            self._recording.armed = samples_micro_batch(trainer, batch_idx, len(self.history)) or not self._window.whole

    def on_before_backward(self, trainer, pl_module, loss) -> None:
        """The AMP loss scale of the recorded micro-batch's backward, divided out of its upstream."""
        recording = self._recording
        if recording is not None and recording.finished_forward and recording.upstream is None:
            self._window.note_loss_scale(trainer)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._recording is not None and window_ends(trainer, batch_idx):
            self._finish_window(trainer)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if self._recording is not None:  # an epoch of unknown length ended mid-window: its short window is done
            self._finish_window(trainer)

    def _finish_window(self, trainer: pl.Trainer) -> None:
        recording, step = self._recording, self._recording_step
        if self._unused_declaration(trainer, recording):
            return
        self._recording = None
        recording.remove()
        self.last_checked_step = step
        started = time.perf_counter()
        outcome = self._run_check(trainer, recording, step)
        if outcome is not None:
            self._report(trainer, outcome, time.perf_counter() - started)

    def _unused_declaration(self, trainer: pl.Trainer, recording: SeamRecording) -> bool:
        """Whether the guard, left with the ``ce_guard.seam(...)`` call, saw none in a whole check step before any
        verdict: then there is nothing to guard, and it says so once (every rank alike)."""
        if not isinstance(self._seam, DeclaredSeam) or self.history or self.missed:
            return False
        if not _any_rank(trainer, not recording.finished_forward):
            return False
        recording.remove()
        self._recording = None
        self._refuse(no_declared_call(trainer.lightning_module))
        return True

    def on_train_end(self, trainer, pl_module) -> None:
        if self._recording is not None:
            self._recording.remove()
            self._recording = None

    def on_fit_end(self, trainer, pl_module) -> None:
        if self._seam is not None and trainer.is_global_zero:
            rank_zero_info("\n".join(summary_lines(self.history, self.missed, self._receipts_path(trainer))))

    def _run_check(self, trainer: pl.Trainer, recording: SeamRecording, step: int) -> _Outcome | None:
        problem = recording.problem()
        # Agree before any collective: if one rank cannot check, none does (no rank waits for another).
        if _any_rank(trainer, problem is not None):
            self._miss(trainer, step, f"skipped: {problem or 'another rank could not record the seam'}")
            return None
        contract = recording.contract
        sizes = {**group_sizes(trainer, contract), **self.extra_group_sizes}
        training = self.training_contract
        if training == "auto":  # the seam's own code may say (Megatron's calculate_per_token_loss), else its contract
            training = recording.training or implied_training_contract(contract)
        try:
            window = None if training is None else self._window.counts(trainer, recording, sizes["DP"])
            record = recording.to_record(self.replay_weight_grad)
            result = check_seam(record, contract, group_sizes=sizes, sample_tokens=self.sample_tokens,
                                budget_tokens=self.budget_tokens, safety=self.safety, thresholds=self.thresholds,
                                window=window, training=training)
            if window is not None and recording.terms:  # loss terms beside the seam (Megatron's MTP depths)
                result = with_terms(result, recording.term_weights(window, training), group_sizes=sizes,
                                    thresholds=self.thresholds)
            error = None
        except Exception as err:  # under `warn` a failed check must never end training
            if self.policy != "warn":
                raise
            result, error = None, f"{type(err).__name__}: {err}"
        if _any_rank(trainer, error is not None):
            self._miss(trainer, step, f"failed: {error or 'on another rank'}")
            return None
        d = result.diagnosis
        verdict = {"rank": trainer.global_rank, "cause": d.cause.value, "variant": d.variant, "drift": d.drift,
                   "summary": d.summary}
        agreed = agree(verdict, *check_metrics(result.report, self.thresholds), device=record.hidden.device)
        return _Outcome(step, contract, record, result, agreed)

    # ------------------------------------------------------------------------------------ reporting
    def _report(self, trainer: pl.Trainer, outcome: _Outcome, seconds: float) -> None:
        """Log, remember, tell listeners, keep the evidence, then apply the policy: on every rank alike."""
        metrics = self._log_metrics(trainer, outcome, seconds)
        previous = self.last_verdict
        entry = self._remember(trainer, outcome)
        # A drift that goes on with the same cause (checked every step while it does) keeps its first bundle.
        repeat = (entry["drift"] and previous is not None and previous["drift"]
                  and previous["cause"] == entry["cause"])
        bundle = self._keep_bundle(trainer, outcome, entry["drift"], repeat)
        if trainer.is_global_zero:
            self._write_receipt(trainer, outcome, entry, metrics, bundle)
        if entry["drift"]:
            self._apply_policy(trainer, entry, bundle, repeat)

    def _log_metrics(self, trainer: pl.Trainer, outcome: _Outcome, seconds: float) -> dict[str, float]:
        agreed = outcome.agreement
        metrics = {metric_key(name): value for name, value in agreed.metrics.items()}
        metrics.update({metric_key("drift"): float(agreed.drifting_ranks > 0), metric_key("check_seconds"): seconds})
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=outcome.step)
        return metrics

    def _remember(self, trainer: pl.Trainer, outcome: _Outcome) -> dict[str, Any]:
        """Append the agreed verdict to ``history``, set the check rate from it, and tell the listeners."""
        step = outcome.step
        entry = outcome.agreement.history_entry(step)
        self.history.append(entry)
        if self.policy == "warn" and (message := self.rate.after_check(entry["drift"], step)):
            rank_zero_info(f"CEParityCallback: {message}")
        self._notify(trainer, step, entry, "")
        return entry

    def _keep_bundle(self, trainer: pl.Trainer, outcome: _Outcome, drifting: bool, repeat: bool) -> str | None:
        """This rank's repro bundle of the drift going on: the first one of a repeat, else a new one on drift."""
        if not (repeat and self._streak_bundle is not None):
            self._streak_bundle = self._write_bundle(trainer, outcome) if drifting else None
        return self._streak_bundle

    def _write_bundle(self, trainer: pl.Trainer, outcome: _Outcome) -> str:
        return write_bundle(self._run_dir(trainer), outcome.step, trainer.global_rank, outcome.contract,
                            outcome.record, outcome.result)

    def _write_receipt(self, trainer: pl.Trainer, outcome: _Outcome, entry: dict[str, Any],
                       metrics: dict[str, float], bundle: str | None) -> None:
        receipt = check_receipt(entry, trainer.current_epoch, metrics, outcome.agreement, outcome.result,
                                outcome.contract, bundle)
        append_receipt(self._receipts_path(trainer), receipt)
        self._panels.log_check(receipt)

    def _apply_policy(self, trainer: pl.Trainer, entry: dict[str, Any], bundle: str | None, repeat: bool) -> None:
        step, rank, cause, summary = entry["step"], entry["rank"], entry["cause"], entry["summary"]
        if self.policy == "raise":
            raise SeamDriftError(step, rank, cause, summary)
        self._streak = self._streak + 1 if repeat else 1
        if repeat:
            if self._streak % self.remind_every == 0:
                rank_zero_info(f"CE seam still drifting at step {step}: {cause}, {self._streak} checks in a row"
                               f" (bundle: {bundle}).")
            return
        rank_zero_warn(drift_warning(step, rank, cause, summary, bundle))
        if self.policy == "stop":
            trainer.should_stop = True

    def _miss(self, trainer: pl.Trainer, step: int, reason: str) -> None:
        """A check step without a verdict: warned, kept in ``missed``, logged as ``ce_parity/missed`` (a gap
        in the panels has a reason), and told to listeners."""
        rank_zero_warn(f"CEParityCallback: the check at step {step} {reason}")
        self.missed.append({"step": step, "reason": reason})
        for logger in trainer.loggers:
            logger.log_metrics({metric_key("missed"): 1.0}, step=step)
        self._notify(trainer, step, None, reason)

    def _notify(self, trainer: pl.Trainer, step: int, entry: dict[str, Any] | None, reason: str) -> None:
        for listener in self._listeners:
            listener(trainer, step, entry, reason)

    def _run_dir(self, trainer: pl.Trainer) -> str:
        return self.run_dir or trainer.default_root_dir

    def _receipts_path(self, trainer: pl.Trainer) -> Path:
        return Path(self._run_dir(trainer)) / "ce_guard" / "receipts.jsonl"

    # ------------------------------------------------------------------------------------ state
    @property
    def last_verdict(self) -> dict[str, Any] | None:
        return self.history[-1] if self.history else None

    def state_dict(self) -> dict[str, Any]:
        return {"last_checked_step": self.last_checked_step, "history": [dict(h) for h in self.history],
                "missed": [dict(m) for m in self.missed], "clean_checks_owed": self.rate.clean_checks_owed}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.last_checked_step = int(state_dict["last_checked_step"])
        self.history = [dict(h) for h in state_dict["history"]]
        self.missed = [dict(m) for m in state_dict.get("missed", [])]
        self.rate.clean_checks_owed = state_dict.get("clean_checks_owed")
        self._resumed = True


def _any_rank(trainer: pl.Trainer, flag: bool) -> bool:
    """One collective: True on every rank if ``flag`` is True on any rank."""
    return bool(trainer.strategy.reduce_boolean_decision(flag, all=False))
