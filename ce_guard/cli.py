"""ce-guard: reproduce a seam check from a config, replay a drift bundle, report on receipts.

Exit codes (every subcommand):
    0  checked, and every check is within budget
    1  drift found (a check outside budget, or a receipt with drift)
    2  bad input or usage: a missing or corrupt file, an unknown receipt schema, an impossible contract,
       an unknown config key. One ``ce-guard: error: ...`` line on stderr, no traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import itertools
import json
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.text import Text
from torch import nn

from ce_guard.bundle import BundleError, load_bundle
from ce_guard.check import CheckResult, SeamRecord, check_seam
from ce_guard.contract import CEContract
from ce_guard.parity import SeamOutputs
from ce_guard.parity_config import (CONTRACT_KEYS, FUSED_PATHS, ConfigError, FusedSpec, load_parity_config,
                                   make_inputs)
from ce_guard.receipt import SCHEMA_VERSION, ReceiptError, read_receipts
from ce_guard.testing import fused_layer

EXIT_OK, EXIT_DRIFT, EXIT_USAGE = 0, 1, 2


PARITY_CONFIG_HELP = """\
config (YAML; only these keys):
  shapes: {tokens: 1024, hidden: 64, vocab: 2000, seed: 0}   # N, D, V; seeds inputs and weight
  dtype: float32                 # of hidden and weight: float32 | bfloat16 | float16 | float64
  ignore_fraction: 0.1           # share of targets set to ignore_index
  contract: {label_smoothing: 0.1, z_loss: 1.0e-4}           # CEContract fields (vocab_size from shapes)
  fused: {path: ce_guard, fault: grad_scale, fault_scale: 4, token_chunk: 256}  # or liger | cce | torch
  group_sizes: {grad_accum: 4}   # sizes a scale factor may be traced to
  check: {budget_tokens: 256, safety: 4.0}

exit codes: 0 within budget, 1 drift, 2 bad config or usage"""


class UsageError(Exception):
    """Bad input: reported as one line and exit code 2 (as are a bad config, bundle or receipts file)."""


def _expect(ok: bool, message: str) -> None:
    if not ok:
        raise UsageError(message)


# ------------------------------------------------------------------------------------- fused paths
def build_fused(path: str, contract: CEContract, weight: nn.Parameter,
                spec: FusedSpec | None = None) -> nn.Module:
    """The fused path ``path`` over ``weight`` (V, D), asked to keep ``contract``'s promises.

    A peer adapter declares the contract it really keeps (its accumulator dtype included); a contract
    field it cannot express is a :class:`UsageError` rather than a silently different check.
    """
    spec = spec or FusedSpec(path=path)
    hidden_size = weight.shape[1]
    if path == "ce_guard":
        try:
            return fused_layer(hidden_size, contract, weight=weight, token_chunk=spec.token_chunk,
                               fault=spec.fault, fault_scale=spec.fault_scale)
        except ValueError as err:
            raise UsageError(f"fused path ce_guard: {err}") from err
    from ce_guard import adapters

    adapter = {"liger": adapters.LigerFusedLinearCrossEntropy, "cce": adapters.CutCrossEntropy,
               "torch": adapters.TorchLinearCrossEntropy}[path]
    defaults = CEContract(vocab_size=contract.vocab_size).to_dict()
    asked = {k: v for k, v in contract.to_dict().items() if v != defaults[k] and k != "accum_dtype"}
    takes = inspect.signature(adapter).parameters
    cannot = sorted(set(asked) - set(takes))
    _expect(not cannot, f"fused path {path} cannot express contract fields {cannot}"
                        f" (it takes {sorted(set(takes) & set(CONTRACT_KEYS) - {'vocab_size'})}).")
    try:
        return adapter(hidden_size, contract.vocab_size, weight=weight, **asked)
    except (ImportError, ValueError) as err:
        raise UsageError(f"fused path {path}: {' '.join(str(err).split())}") from err


def run_fused(module: nn.Module, hidden: torch.Tensor, targets: torch.Tensor,
              upstream: torch.Tensor | float) -> SeamRecord:
    """Forward and backward through ``module`` with ``upstream`` as dTotal/dloss, as training would."""
    h = hidden.detach().requires_grad_()
    loss = module(h, targets)
    grad_out = torch.as_tensor(upstream, dtype=loss.dtype, device=loss.device).expand_as(loss)
    grad_hidden, grad_weight = torch.autograd.grad(loss, [h, module.weight], grad_outputs=grad_out)
    fused = SeamOutputs(loss=loss.detach().float(), grad_hidden=grad_hidden, grad_weight=grad_weight)
    return SeamRecord(hidden=hidden.detach(), weight=module.weight.detach(), targets=targets, fused=fused,
                      upstream=upstream)


# ---------------------------------------------------------------------------------------- commands
def cmd_parity(args: argparse.Namespace, out: Console, err: Console) -> int:
    config = load_parity_config(args.config)
    device = _device(args.device)
    with _progress(err, total=3) as step:
        step("building inputs and the fused path")
        hidden, weight, targets = make_inputs(config, device)
        module = build_fused(config.fused.path, config.contract, weight, config.fused)
        step(f"{config.fused.path}: forward + backward on {config.tokens} tokens")
        upstream = torch.ones(targets.shape, device=device) if config.contract.reduction == "none" else 1.0
        record = run_fused(module, hidden, targets, upstream)
        step("reference, native budget, diagnosis")
        result = check_seam(record, module.ce_contract, group_sizes=config.group_sizes,
                            budget_tokens=config.budget_tokens, safety=config.safety)
    what = config.fused.path + (f" with fault {config.fused.fault}" if config.fused.fault else "")
    _print_header(out, "ce-guard parity", str(args.config))
    _print_row(out, "fused path", f"{what}; {config.tokens} tokens x D={config.hidden} -> V={config.vocab},"
                                  f" {_dtype(config.dtype)} on {device}")
    _print_check(out, module.ce_contract, result)
    if args.out:
        receipt = {"schema_version": SCHEMA_VERSION, "config": str(args.config), "fused_path": what,
                   "contract": module.ce_contract.to_dict(), "report": result.report.to_dict(),
                   "diagnosis": result.diagnosis.to_dict()}
        Path(args.out).write_text(json.dumps(receipt, indent=2, default=str) + "\n")
        _print_row(out, "receipt", str(args.out))
    return EXIT_DRIFT if result.diagnosis.drift else EXIT_OK


def cmd_replay(args: argparse.Namespace, out: Console, err: Console) -> int:
    device = _device(args.device)
    bundle = load_bundle(args.bundle, map_location=device)
    _expect_replayable_alone(args.bundle, bundle.contract)
    try:
        contract = CEContract.from_dict(bundle.contract)
    except ValueError as error:
        raise UsageError(f"{args.bundle}: contract: {error}") from error
    recorded = bundle.diagnosis
    with _progress(err, total=2 if args.fused else 1) as step:
        step("replaying the recorded fused outputs against the reference")
        replayed = check_seam(bundle.record, contract)
        rerun = None
        if args.fused:
            step(f"{args.fused}: forward + backward on the bundle's inputs")
            record = bundle.record
            module = build_fused(args.fused, contract, nn.Parameter(record.weight.clone()))
            rerun_record = run_fused(module, record.hidden, record.targets, record.upstream)
            rerun = check_seam(rerun_record, module.ce_contract)

    _print_header(out, "ce-guard replay", f"{args.bundle} (step {bundle.step}, rank {bundle.rank})")
    _print_row(out, "contract", str(contract))
    _print_row(out, "recorded", f"{recorded['cause']}: {recorded['summary']}")
    cause = replayed.diagnosis.cause.value
    same = cause == recorded["cause"]
    _print_row(out, "replayed", f"{cause}: {replayed.diagnosis.summary}")
    if replayed.diagnosis.drift:
        how = "same cause" if same else f"but the recorded cause was {recorded['cause']}"
        _print_row(out, "verdict", f"drift reproduces ({how})", style="bold red")
    else:
        _print_row(out, "verdict", "drift does not reproduce on the recorded outputs", style="bold green")
    if rerun is None:
        return EXIT_DRIFT if replayed.diagnosis.drift else EXIT_OK
    _print_header(out, f"--fused {args.fused}", "the same inputs through another implementation")
    _print_check(out, module.ce_contract, rerun)
    return EXIT_DRIFT if rerun.diagnosis.drift else EXIT_OK


def cmd_report(args: argparse.Namespace, out: Console, err: Console) -> int:
    from ce_guard import report

    source = Path(args.run_dir)
    path = source if source.is_file() else source / "ce_guard" / "receipts.jsonl"
    _expect(path.is_file(), f"no receipts at {path}; pass a run directory holding ce_guard/receipts.jsonl"
                            " or the receipts file itself.")
    out_dir = Path(args.out) if args.out else path.parent
    with _progress(err, total=3) as step:
        step(f"reading {path}")
        records = list(read_receipts(path))
        _expect(bool(records), f"{path} holds no receipts yet.")
        out_dir.mkdir(parents=True, exist_ok=True)
        step("plotting")
        png = report.plot_receipts(records, out_dir / "parity_report.png")
        step("writing HTML")
        page = report.write_html(records, png, out_dir / "parity_report.html", source=str(path))
    drifts = [r for r in records if r.get("drift")]
    _print_header(out, "ce-guard report", str(path))
    _print_row(out, "checks", f"{len(records)} (steps {records[0]['step']}..{records[-1]['step']}),"
                              f" {len(drifts)} with drift")
    for record in drifts[:1]:
        _print_row(out, "first drift", f"step {record['step']}: {record['cause']}: {record['summary']}",
                   style="bold red")
    _print_row(out, "wrote", f"{png}  {page}")
    return EXIT_DRIFT if drifts else EXIT_OK


def _expect_replayable_alone(path: str, contract: dict[str, Any]) -> None:
    """One process holds one rank's share: a bundle from a TP group, or a global-token mean over a token
    group, needs the other ranks' shares to be replayed."""
    tp, dp = contract.get("tp_group_size", 1), contract.get("token_group_size", 1)
    global_mean = contract.get("normalize_by") == "global_tokens" and dp > 1
    _expect(tp == 1 and not global_mean,
            f"{path}: recorded with a TP group of {tp} and a token group of {dp}"
            f"{' for a global-token mean' if global_mean else ''}; one process cannot replay the other ranks'"
            " shares. Replay it in the run's own process layout.")


# ------------------------------------------------------------------------------------------ output
def _print_header(out: Console, title: str, subject: str) -> None:
    out.print(Text.assemble((title, "bold"), "  ", subject))


def _print_row(out: Console, label: str, value: str, style: str | None = None) -> None:
    out.print(Text.assemble(f"  {label:<12}", (value, style or "")))


def _print_check(out: Console, contract: CEContract, result: CheckResult) -> None:
    r, d = result.report, result.diagnosis
    _print_row(out, "contract", str(contract))
    _print_row(out, "loss", f"fused {r.loss_fused:.6g}, reference {r.loss_ref:.6g},"
                            f" rel err {r.loss_rel_err:.3g} (budget {r.budget.loss_rel:.3g})")
    if r.grad_hidden_rel_err is not None:
        _print_row(out, "dL/dh", f"norm ratio {r.grad_hidden_norm_ratio:.6g},"
                                 f" cosine {r.grad_hidden_cosine:.6f}, rel err {r.grad_hidden_rel_err:.3g}"
                                 f" (budget {r.budget.grad_hidden_rel:.3g})")
    if r.grad_weight_rel_err is not None:
        _print_row(out, "dL/dW", f"norm ratio {r.grad_weight_norm_ratio:.6g},"
                                 f" rel err {r.grad_weight_rel_err:.3g}"
                                 f" (budget {r.budget.grad_weight_rel:.3g})")
    _print_row(out, "budget", r.budget.source)
    if r.signature is not None:
        fit = r.signature
        _print_row(out, "fit", f"dL/dh error on {fit.tokens} tokens: scale {fit.scale:+.3g} ({fit.sigmas('scale'):.1f}"
                               f" sigma), target {fit.target:+.3g} ({fit.sigmas('target'):.1f} sigma), shift"
                               f" {fit.shift:+.3g} ({fit.sigmas('shift'):.1f} sigma), residual {fit.residual_rel:.3g},"
                               f" softmax spread {fit.softmax_spread:.3g}x native ({fit.spread_sigmas():.1f} sigma)")
    row = f" ({d.catalogue_entry})" if d.catalogue_entry else ""
    verdict = f"{'DRIFT' if d.drift else 'ok'}: {d.cause.value}{row}: {d.summary}"
    _print_row(out, "verdict", verdict, style="bold red" if d.drift else "bold green")


@contextlib.contextmanager
def _progress(console: Console, total: int) -> Iterator[Callable[[str], None]]:
    """A transient bar on stderr; ``step(description)`` starts the next of ``total`` steps."""
    columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn())
    # Only on a terminal: in logs and pipes a bar is noise, and a bad-input error must stay one line.
    with Progress(*columns, console=console, transient=True, disable=not console.is_terminal) as progress:
        task = progress.add_task("", total=total)
        done = itertools.count()  # steps finished before the one being started
        yield lambda description: progress.update(task, description=description, completed=next(done))
        progress.update(task, completed=total)


def _device(name: str) -> torch.device:
    _expect(name != "cuda" or torch.cuda.is_available(), "--device cuda, but torch sees no CUDA device.")
    return torch.device(name)


def _dtype(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# ------------------------------------------------------------------------------------------- parser
class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line like every other bad input, where argparse adds the usage
        raise UsageError(f"{message} (see `{self.prog} --help`)")


def build_parser() -> argparse.ArgumentParser:
    raw = argparse.RawDescriptionHelpFormatter
    parser = _Parser(prog="ce-guard", description=__doc__.split("\n\n")[0],
                     epilog="exit codes: 0 within budget, 1 drift found, 2 bad input or usage",
                     formatter_class=raw)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    parity = commands.add_parser(
        "parity", help="check a fused path on seeded inputs against the reference", formatter_class=raw,
        description="Build inputs from a YAML config (shapes, dtype, contract, fused path with an optional\n"
                    "fault, group sizes), run the fused path forward and backward, check the seam against\n"
                    "the reference and print a receipt.",
        epilog=PARITY_CONFIG_HELP)
    parity.add_argument("--config", required=True, help="e.g. configs/parity/clean.yaml")
    parity.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="default: cpu")
    parity.add_argument("--out", help="also write the receipt as JSON to this file")
    parity.set_defaults(handler=cmd_parity)

    replay = commands.add_parser(
        "replay", help="re-check a repro bundle written by CEParityCallback",
        description="Re-run the check on a bundle's recorded inputs and fused outputs and say whether the\n"
                    "drift reproduces with the same cause. With --fused, also run that implementation on\n"
                    "the same inputs.", formatter_class=raw,
        epilog="exit codes: 0 no drift, 1 drift reproduces (with --fused: that path drifts),\n"
               "2 missing or corrupt bundle, or usage")
    replay.add_argument("bundle", help="ce_guard/bundles/stepXXXXXXXX_rankR.pt")
    replay.add_argument("--fused", choices=FUSED_PATHS, help="re-run this fused path on the bundle's inputs")
    replay.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="default: cpu")
    replay.set_defaults(handler=cmd_replay)

    report = commands.add_parser(
        "report", help="plot receipts: parity_report.png and parity_report.html",
        description="From receipts alone, plot each check's error / budget margins, loss rel err, dL/dh norm\n"
                    "ratio, 1 - dL/dh cosine (log) and dL/dW norm ratio over steps, drift marked with its cause,\n"
                    "and write a self-contained HTML page.",
        formatter_class=raw,
        epilog="exit codes: 0 no drift in the receipts, 1 some drift, 2 missing receipts, unknown schema,\n"
               "or usage")
    report.add_argument("run_dir", metavar="RUN_DIR",
                        help="a run directory holding ce_guard/receipts.jsonl, or a receipts file")
    report.add_argument("--out", help="output directory (default: next to the receipts)")
    report.set_defaults(handler=cmd_report)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``ce-guard`` console script; returns the exit code."""
    out, err = Console(highlight=False, soft_wrap=True), Console(stderr=True, highlight=False)
    try:
        args = build_parser().parse_args(argv)
        return args.handler(args, out, err)
    except (UsageError, ConfigError, BundleError, ReceiptError) as error:
        print(f"ce-guard: error: {' '.join(str(error).split())}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
