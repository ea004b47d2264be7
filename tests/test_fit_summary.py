"""The end-of-fit summary a user without a logger reads: checks, drifts, the first one, misses, receipts."""

from ce_guard.fit_summary import summary_lines


def test_a_clean_fit_says_so_and_where_the_receipts_are(tmp_path):
    receipts = tmp_path / "ce_guard" / "receipts.jsonl"
    receipts.parent.mkdir()
    receipts.write_text("{}\n")
    lines = summary_lines([{"step": 0, "drift": False, "cause": "within_budget", "summary": "", "rank": 0}], [],
                          receipts)
    assert lines == ["ce_guard: 1 checks, 0 with drift, 0 missed.", "  last verdict: step 0: clean (within_budget)",
                     f"  receipts: {receipts}", f"  plots: ce-guard report {tmp_path}"]


def test_the_first_drift_and_the_missed_checks_are_named(tmp_path):
    history = [{"step": 0, "drift": False, "cause": "within_budget", "summary": "", "rank": 0},
               {"step": 50, "drift": True, "cause": "ignore_index_leak", "summary": "padding divides", "rank": 1},
               {"step": 51, "drift": True, "cause": "ignore_index_leak", "summary": "padding divides", "rank": 1}]
    missed = [{"step": 100, "reason": "failed: RuntimeError: x"}, {"step": 150, "reason": "failed: OOM"}]
    lines = summary_lines(history, missed, tmp_path / "none.jsonl")
    assert lines[0] == "ce_guard: 3 checks, 2 with drift, 2 missed."
    assert "  first drift: step 50 (rank 1): ignore_index_leak: padding divides" in lines
    assert "  missed: 2 check steps without a verdict; the last, step 150: failed: OOM" in lines
    assert lines[-1] == "  receipts: none written"
