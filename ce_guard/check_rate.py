"""How often a guard checks: every ``every_n_steps`` steps, and from a drift verdict every
``every_n_steps_while_drifting`` until ``clean_checks_to_relax`` clean checks in a row.

Both parity callbacks (Lightning's and transformers' Trainer's) keep one. It reads agreed verdicts only, so every
rank holds the same rate and no collective decides a check step.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class CheckRate:
    """The check period and the clean checks still owed before it relaxes (None: relaxed).

    Args:
        every_n_steps: the period while the seam is clean.
        every_n_steps_while_drifting: the period from a drift verdict on; None keeps ``every_n_steps`` throughout.
        clean_checks_to_relax: clean checks in a row that bring the period back to ``every_n_steps``.
    """

    every_n_steps: int
    every_n_steps_while_drifting: int | None = 1
    clean_checks_to_relax: int = 3
    clean_checks_owed: int | None = None

    @property
    def every(self) -> int:
        return self.every_n_steps if self.clean_checks_owed is None else self.every_n_steps_while_drifting

    def after_check(self, drifting: bool, step: int) -> str | None:
        """Count one agreed verdict; the sentence to log where the period changes, else None."""
        if self.every_n_steps_while_drifting is None:
            return None
        if drifting:
            tightened = self.clean_checks_owed is None
            self.clean_checks_owed = self.clean_checks_to_relax
            return (f"drift at step {step}: checking every {self.every_n_steps_while_drifting} steps until"
                    f" {self.clean_checks_to_relax} clean checks in a row.") if tightened else None
        if self.clean_checks_owed is None:
            return None
        self.clean_checks_owed -= 1
        if self.clean_checks_owed:
            return None
        self.clean_checks_owed = None
        return (f"{self.clean_checks_to_relax} clean checks in a row by step {step}: back to every"
                f" {self.every_n_steps} steps.")
