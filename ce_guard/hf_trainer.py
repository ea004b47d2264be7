"""CEParityTrainerCallback: the seam's parity check in transformers' ``Trainer`` (and TRL's trainers, which subclass it).

The same check as the Lightning callback (:class:`ce_guard.callbacks.CEParityCallback`), over the same Trainer-free
core: on a check step the callback records the seam (:mod:`ce_guard.seams`) on one micro-batch of the optimizer
step's accumulation window and counts the window's tokens; at the window's end (``on_pre_optimizer_step``: the
gradient is complete, the parameters have not moved) it checks the seam and the weight its loss reached the optimizer
with (:func:`ce_guard.check.check_seam`), has every rank agree (:func:`ce_guard.agreement.agree`), then logs, writes
the receipt and, on drift, the repro bundle, and applies its policy. Other steps pay one integer modulo. How the
Trainer weighs the window is read from ``TrainingArguments`` and, where given, the Trainer itself; no Lightning.
"""

from __future__ import annotations

import inspect
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.utils import logging

from ce_guard import _dist
from ce_guard.agreement import agree
from ce_guard.check import check_seam
from ce_guard.check_options import check_options
from ce_guard.check_rate import CheckRate
from ce_guard.diagnosis import Thresholds
from ce_guard.drift import Policy, SeamDriftError, drift_warning
from ce_guard.evidence import check_receipt, write_bundle
from ce_guard.fit_summary import summary_lines
from ce_guard.metrics import check_metrics, metric_key
from ce_guard.receipt import append_receipt
from ce_guard.recording import SeamRecording
from ce_guard.seams.causal_lm import CausalLMSeam, is_causal_lm
from ce_guard.seams.label_smoother import LabelSmootherSeam
from ce_guard.seams.refusal import SeamRefused
from ce_guard.step_weight import StepWindow, TrainingContract

logger = logging.get_logger(__name__)

# What a check adds to the Trainer's logs (W&B, TensorBoard, `state.log_history`): the verdict and the readings the
# parity report plots; the receipts keep every number.
TRAINER_LOGS = ("drift", "loss_rel_err", "grad_hidden_norm_ratio", "grad_cosine", "step_weight_factor",
                "margin_loss", "margin_grad_hidden", "margin_softmax", "check_seconds")
_PASS_TRAINER = ("`callback = CEParityTrainerCallback(trainer=trainer)` then `trainer.add_callback(callback)`"
                 " (docs/integrations.md)")


class CEParityTrainerCallback(TrainerCallback):
    """Every ``every_n_steps`` optimizer steps, hold a Hugging Face causal LM's output layer to its contract.

    Under gradient accumulation each check records one micro-batch, a different position of the window each time
    (the checks' count modulo the window), and counts the others, so the recorded one's weight in the step can be
    held to ``training_contract``.

    Args:
        every_n_steps: check when ``state.global_step`` is a multiple of this (step 0 included).
        every_n_steps_while_drifting: under ``warn``, after a drift verdict check this often instead, until
            ``clean_checks_to_relax`` clean checks in a row; None keeps ``every_n_steps`` throughout.
        policy: on drift, ``warn`` (a warning on the main process), ``raise`` (:class:`ce_guard.SeamDriftError` on
            every rank, before the optimizer step) or ``stop`` (``control.should_training_stop``). A drift writes a
            repro bundle; one that goes on with the same cause keeps its first.
        trainer: the ``Trainer`` (a ``TrainerCallback`` is not handed it): needed where the Trainer computes the loss
            outside the model (``label_smoothing_factor > 0``); with it, checks also go to the Trainer's logs
            (``trainer.log``: every ``report_to`` integration and ``state.log_history``) and the AMP loss scale is read.
        sample_tokens: compare dL/dh on this many tokens only; the loss and the token count still see every token.
        budget_tokens: tokens the native error budget is measured on; ``safety`` multiplies it.
        run_dir: where receipts and bundles go (``<run_dir>/ce_guard/``); defaults to ``args.output_dir``.
        group_sizes: extra sizes a scale factor may be traced to; DP (the world) and grad_accum are filled in.
        thresholds: the cut-offs of the verdict and the diagnosis; the calibrated defaults when None.
        training_contract: the weight each micro-batch's loss must carry in the optimizer step. ``auto``: the
            Trainer's own: ``global_tokens`` where it divides by ``num_items_in_batch`` gathered over devices
            (``average_tokens_across_devices``), ``window_tokens`` where it divides by the window's count alone,
            else ``micro_batch_mean`` (its divide by the window's micro-batches). None checks the seam alone.

    Raises:
        ce_guard.seams.SeamRefused: at train begin under ``raise`` or ``stop``, for a model or loss it cannot
            guard (under ``warn``: a warning, and the callback is off for the run).

    Example:
        >>> trainer = Trainer(model=model, args=args, train_dataset=data)  # doctest: +SKIP
        >>> trainer.add_callback(CEParityTrainerCallback(trainer=trainer, every_n_steps=100))  # doctest: +SKIP
    """

    def __init__(
        self,
        every_n_steps: int = 100,
        *,
        every_n_steps_while_drifting: int | None = 1,
        clean_checks_to_relax: int = 3,
        policy: Policy = "warn",
        trainer: Any = None,
        sample_tokens: int | None = None,
        budget_tokens: int = 256,
        safety: float = 4.0,
        run_dir: str | None = None,
        group_sizes: Mapping[str, int] | None = None,
        thresholds: Thresholds | None = None,
        training_contract: TrainingContract | Literal["auto"] | None = "auto",
    ) -> None:
        check_options(policy=policy, thresholds=thresholds, training_contract=training_contract,
                      counts={"every_n_steps": every_n_steps, "clean_checks_to_relax": clean_checks_to_relax},
                      optional_counts={"every_n_steps_while_drifting": every_n_steps_while_drifting,
                                       "sample_tokens": sample_tokens})
        self.rate = CheckRate(every_n_steps, every_n_steps_while_drifting, clean_checks_to_relax)
        self.policy = policy
        self.trainer = trainer
        self.sample_tokens = sample_tokens
        self.budget_tokens = budget_tokens
        self.safety = safety
        self.run_dir = run_dir
        self.extra_group_sizes = dict(group_sizes or {})
        self.thresholds = thresholds or Thresholds()
        self.training_contract = training_contract
        self.history: list[dict[str, Any]] = []  # one agreed verdict per check, alike on every rank
        self.missed: list[dict[str, Any]] = []   # check steps without a verdict: {"step", "reason"}
        self._seam: CausalLMSeam | LabelSmootherSeam | None = None
        self._training: TrainingContract | None = None
        self._recording: SeamRecording | None = None
        self._step = -1             # the step being recorded
        self._position = 0          # the micro-batch of the window this check records
        self._micro_batches = 0     # micro-batches of the window begun so far
        self._streak_bundle: str | None = None
        self._to_log: dict[str, float] | None = None

    # ----------------------------------------------------------------------------------------- set-up
    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model=None,
                       **kwargs) -> None:
        self._args = args
        try:
            self._seam = self._find_seam(args, model)
        except SeamRefused as err:
            self._refuse(str(err))
            return
        except Exception as err:  # under `warn` the guard never ends a run it cannot start
            if self.policy != "warn":
                raise
            self._refuse(f"finding the seam failed ({type(err).__name__}: {err}).")
            return
        self._training = (self._implied_training_contract(args, model) if self.training_contract == "auto"
                          else self.training_contract)
        if self.trainer is None:
            logger.info(f"CEParityTrainerCallback: checks go to the receipts ({self._receipts_path()}) only; pass the"
                        f" Trainer for them in its logs too: {_PASS_TRAINER}.")
        logger.info(f"CEParityTrainerCallback: guarding {self._seam.describe()} every {self.rate.every_n_steps} steps"
                    f" under {self._seam.contract}; training contract {self._training}.")

    def _find_seam(self, args: TrainingArguments, model: Any) -> CausalLMSeam | LabelSmootherSeam:
        """The causal LM's own loss, or the Trainer's label smoother over its logits; refused in one sentence."""
        if not is_causal_lm(model):
            raise SeamRefused(f"it guards a transformers causal LM (a `*ForCausalLM`: `loss_type='ForCausalLM'` and an"
                              f" output head), got {type(model).__name__}; train other models under Lightning with"
                              " `ce_guard.CEParityCallback` and declare their seam (docs/integrations.md).")
        if args.n_gpu > 1:
            raise SeamRefused(f"the Trainer runs {args.n_gpu} GPUs in one process (`nn.DataParallel`), whose replicas"
                              " the seam's hooks cannot follow; launch one process per GPU (`torchrun`, `accelerate"
                              " launch`).")
        if self.trainer is not None and getattr(self.trainer, "compute_loss_func", None) is not None:
            raise SeamRefused("the Trainer's `compute_loss_func` computes the loss from the logits outside the model,"
                              " a seam this callback does not record; leave it unset so the model computes the loss.")
        if args.label_smoothing_factor > 0:
            if self.trainer is None:
                raise SeamRefused(f"with `label_smoothing_factor={args.label_smoothing_factor}` the Trainer computes the"
                                  " loss outside the model, in its label smoother, which only the Trainer reaches;"
                                  f" pass it: {_PASS_TRAINER}.")
            return LabelSmootherSeam(model, self.trainer)
        return CausalLMSeam(model)

    def _implied_training_contract(self, args: TrainingArguments, model: Any) -> TrainingContract:
        """How the Trainer weighs the window: by its counted tokens where ``num_items_in_batch`` reaches the loss (the
        model takes loss kwargs; over every device with ``average_tokens_across_devices``), else each micro-batch's
        mean over the window's micro-batches (the Trainer's ``/ current_gradient_accumulation_steps``)."""
        trainer = self.trainer
        counted = getattr(trainer, "loss_is_scaled_for_ga", None)  # a subclass's own word (transformers >= 5.19)
        if counted is None and trainer is not None:
            counted = bool(trainer.model_accepts_loss_kwargs)
        if counted is None:  # what the Trainer asks the model (transformers' trainer.py, "Model introspection")
            counted = getattr(model, "accepts_loss_kwargs", None)
        if counted is None:
            counted = any(p.kind == p.VAR_KEYWORD for p in inspect.signature(model.forward).parameters.values())
        if not counted:
            return TrainingContract("micro_batch_mean")
        return TrainingContract("global_tokens" if args.average_tokens_across_devices else "window_tokens")

    def _refuse(self, reason: str) -> None:
        """What cannot be guarded is refused in one sentence: a warning under ``warn``, else an error."""
        self._seam = None
        if self.policy != "warn":
            raise SeamRefused(f"CEParityTrainerCallback cannot guard this model: {reason}")
        warnings.warn(f"CEParityTrainerCallback cannot guard this model, so it is off for this run: {reason}",
                      stacklevel=2)

    # ------------------------------------------------------------------------------------ the window
    def is_check_step(self, step: int) -> bool:
        """The same answer on every rank, from counters and agreed verdicts alone."""
        return self._seam is not None and step % self.rate.every == 0

    def on_step_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs) -> None:
        """Before the window's first micro-batch: install the recording on a check step and arm it on the first
        micro-batch if that is the one this check records."""
        if self._recording is None and self.is_check_step(state.global_step):
            window = getattr(self.trainer, "current_gradient_accumulation_steps", args.gradient_accumulation_steps)
            self._recording, self._step = self._seam.record(), state.global_step
            self._position, self._micro_batches = len(self.history) % max(int(window), 1), 0
        self._next_micro_batch()

    def on_substep_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs) -> None:
        """After each micro-batch but the window's last: arm the next one if it is the one this check records."""
        self._next_micro_batch()

    def _next_micro_batch(self) -> None:
        if self._recording is not None:
            self._recording.armed = self._micro_batches == self._position
            self._micro_batches += 1

    def on_pre_optimizer_step(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                              **kwargs) -> TrainerControl:
        """The window's end: every backward of the step has run. Check, report, apply the policy."""
        recording, self._recording = self._recording, None
        if recording is not None:
            recording.remove()
            self._check(recording, state, control, time.perf_counter())
        return control

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs) -> None:
        """The check's metrics into the Trainer's logs, at the step the Trainer logs this update's loss."""
        logs, self._to_log = self._to_log, None
        if logs is not None and self.trainer is not None:
            self.trainer.log(logs)

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs) -> None:
        if self._recording is not None:
            self._recording.remove()
            self._recording = None
        if self._seam is not None and state.is_world_process_zero:
            print("\n".join(summary_lines(self.history, self.missed, self._receipts_path())))

    # ------------------------------------------------------------------------------------ the check
    def _check(self, recording: SeamRecording, state: TrainerState, control: TrainerControl, started: float) -> None:
        step, problem = self._step, recording.problem()
        if recording.error is None and recording.hidden is None and self._position >= self._micro_batches:
            problem = (f"the window had {self._micro_batches} micro-batches, and this check records micro-batch"
                       f" {self._position}")
        elif recording.error is None and recording.hidden is None and isinstance(self._seam, CausalLMSeam):
            problem = ("the model was called without labels: the Trainer computes the loss outside the model (a"
                       " `compute_loss` override, or `compute_loss_func` with no `trainer=` given), a seam this"
                       " callback does not record")
        # Agree before any collective: if one rank cannot check, none does (no rank waits for another).
        if _any_rank(problem is not None, self._args.device):
            self._miss(step, f"skipped: {problem or 'another rank could not record the seam'}")
            return
        contract = recording.contract
        sizes = {"DP": _dist.group_size(dist.group.WORLD), "grad_accum": self._args.gradient_accumulation_steps,
                 **self.extra_group_sizes}
        try:
            record = recording.to_record(replay_weight_grad=False)
            window = None if self._training is None else self._window(recording)
            result = check_seam(record, contract, group_sizes=sizes, sample_tokens=self.sample_tokens,
                                budget_tokens=self.budget_tokens, safety=self.safety, thresholds=self.thresholds,
                                window=window, training=self._training)
            error = None
        except Exception as err:  # under `warn` a failed check must never end training
            if self.policy != "warn":
                raise
            result, error = None, f"{type(err).__name__}: {err}"
        if _any_rank(error is not None, self._args.device):
            self._miss(step, f"failed: {error or 'on another rank'}")
            return
        d, rank = result.diagnosis, _dist.group_rank(dist.group.WORLD)
        verdict = {"rank": rank, "cause": d.cause.value, "variant": d.variant, "drift": d.drift, "summary": d.summary}
        agreed = agree(verdict, *check_metrics(result.report, self.thresholds), device=record.hidden.device)
        metrics = {metric_key(name): value for name, value in agreed.metrics.items()}
        metrics.update({metric_key("drift"): float(agreed.drifting_ranks > 0),
                        metric_key("check_seconds"): time.perf_counter() - started})
        self._to_log = {key: metrics[key] for key in map(metric_key, TRAINER_LOGS) if key in metrics}
        entry = agreed.history_entry(step)
        previous = self.history[-1] if self.history else None
        self.history.append(entry)
        if self.policy == "warn" and (message := self.rate.after_check(entry["drift"], step)):
            logger.info(f"CEParityTrainerCallback: {message}")
        # A drift that goes on with the same cause (checked every step while it does) keeps its first bundle.
        repeat = entry["drift"] and previous is not None and previous["drift"] and previous["cause"] == entry["cause"]
        if not (repeat and self._streak_bundle is not None):
            self._streak_bundle = (write_bundle(self._run_dir(), step, rank, contract, record, result)
                                   if entry["drift"] else None)
        if rank == 0:
            append_receipt(self._receipts_path(), check_receipt(entry, int(state.epoch or 0), metrics, agreed, result,
                                                                contract, self._streak_bundle))
        if entry["drift"]:
            self._apply_policy(entry, control, repeat)

    def _window(self, recording: SeamRecording) -> StepWindow:
        """The window's counts, its tokens summed over the world (a collective on every rank)."""
        scaler = getattr(getattr(self.trainer, "accelerator", None), "scaler", None)  # fp16 AMP's GradScaler
        return recording.window(micro_batches=self._micro_batches, accumulate=self._args.gradient_accumulation_steps,
                                dp_size=_dist.group_size(dist.group.WORLD),
                                loss_scale=float(scaler.get_scale()) if scaler is not None else 1.0)

    def _apply_policy(self, entry: dict[str, Any], control: TrainerControl, repeat: bool) -> None:
        step, rank, cause, summary = entry["step"], entry["rank"], entry["cause"], entry["summary"]
        if self.policy == "raise":
            raise SeamDriftError(step, rank, cause, summary)
        if self.policy == "stop":
            control.should_training_stop = True
        if not repeat and _dist.group_rank(dist.group.WORLD) == 0:
            warnings.warn(drift_warning(step, rank, cause, summary, self._streak_bundle), stacklevel=2)

    def _miss(self, step: int, reason: str) -> None:
        """A check step without a verdict: warned, kept in ``missed``, logged as ``ce_parity/missed``."""
        if _dist.group_rank(dist.group.WORLD) == 0:
            warnings.warn(f"CEParityTrainerCallback: the check at step {step} {reason}", stacklevel=2)
        self.missed.append({"step": step, "reason": reason})
        self._to_log = {metric_key("missed"): 1.0}

    def _run_dir(self) -> str:
        return self.run_dir or self._args.output_dir

    def _receipts_path(self) -> Path:
        return Path(self._run_dir()) / "ce_guard" / "receipts.jsonl"


def _any_rank(flag: bool, device: torch.device) -> bool:
    """One collective: True on every rank if ``flag`` is True on any rank."""
    found = torch.tensor([float(flag)], device=device)
    return bool(_dist.all_reduce(found, dist.ReduceOp.MAX, dist.group.WORLD).item())
