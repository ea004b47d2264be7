"""Judge a parity report: the verdict (is it drift?) and the diagnosis (which seam fault, with the numbers).

``verdict`` decides within budget or not, from the margins; ``rules`` holds the ordered table of signatures from
the fault catalogue (docs/faults.md) that ``diagnose`` walks; ``Thresholds`` holds every cut-off both use.
"""

from ce_guard.diagnosis.causes import FAULT_ROW, Cause, Diagnosis, catalogue_entry
from ce_guard.diagnosis.thresholds import Thresholds
from ce_guard.diagnosis.verdict import judged, margins, over_budget, softmax_margin
from ce_guard.diagnosis.rules import RULES, Rule, diagnose

__all__ = ["FAULT_ROW", "RULES", "Cause", "Diagnosis", "Rule", "Thresholds", "catalogue_entry", "diagnose", "judged",
           "margins", "over_budget", "softmax_margin"]
