"""The preprocessing report: per cause, how many rows, one example row, and what was done with them.

Every tokenized row carries the causes found in it (:class:`lit_sft.data.tokenize.Example` ``issues``, and its
``truncated`` / ``num_loss_tokens``). :func:`build_report` counts them over a split, applies the policies
(``data.on_*`` keys: ``warn`` keeps the row and logs a warning, ``drop`` removes it, ``error`` stops before training
with the count and an example row), and returns the report and the rows to keep.

Causes, in report order (``action`` in the report says what happened):

===================== ============================================================= ===========================
cause                 rows that ...                                                 action
===================== ============================================================= ===========================
truncated             are longer than ``max_length`` (the template's trailing        ``data.truncation``
                      whitespace aside)                                             (``truncate`` / ``drop``)
answer_truncated      lose every answer token to ``max_length``: with all-token      ``data.on_answer_truncated``
                      loss they would train on the prompt only
no_assistant_turn     have no assistant turn (no assistant in the completion):       ``data.on_no_assistant_turn``
                      with all-token loss they would train on the prompt only
unknown_role          have a role that is not a chat role (e.g. ShareGPT's           ``data.on_unknown_role``
                      ``human``/``gpt`` in a ``messages`` column)
unrendered_content    hold content the chat template did not render (a role it       ``data.on_unrendered_content``
                      ignores, ``tools`` it does not take, dropped reasoning)
boundary_moved        have a token straddling an answer's edge, supervised as part   ``count`` (kept)
                      of the answer (``ĠParis`` after ``"Answer: "``)
no_supervised_token   have no supervised token left (always dropped: they add        ``drop``
                      nothing to the loss)
===================== ============================================================= ===========================
"""

from __future__ import annotations

from typing import Any, Literal, Optional

Policy = Literal["warn", "drop", "error"]

POLICY_KEYS = {
    "answer_truncated": "on_answer_truncated",
    "no_assistant_turn": "on_no_assistant_turn",
    "unknown_role": "on_unknown_role",
    "unrendered_content": "on_unrendered_content",
}
"""Cause -> the ``data`` key that sets its policy."""

DEFAULT_POLICIES = {"on_answer_truncated": "drop", "on_no_assistant_turn": "drop", "on_unknown_role": "error",
                    "on_unrendered_content": "error"}

CAUSES = ("truncated", "answer_truncated", "no_assistant_turn", "unknown_role", "unrendered_content",
          "boundary_moved", "no_supervised_token")


def check_policies(policies: dict[str, str]) -> None:
    """Refuse a policy value other than ``warn`` / ``drop`` / ``error``, naming the key."""
    for key, value in policies.items():
        if value not in ("warn", "drop", "error"):
            raise ValueError(f"data.{key}={value!r}: use warn (keep the rows, log them), drop (remove them) or "
                             "error (stop before training)")


def build_report(
    split: str,
    issues: list[list[str]],
    details: list[list[str]],
    truncated: list[bool],
    num_loss_tokens: list[int],
    truncation: str,
    policies: Optional[dict[str, str]] = None,
) -> tuple[dict[str, Any], list[int]]:
    """Count the causes of a split, apply the policies, and choose the rows to keep.

    Args:
        split: the split's name, for messages.
        issues, details: per row, the cause names and their details (parallel lists).
        truncated, num_loss_tokens: per row.
        truncation: ``data.truncation`` (``truncate`` keeps cut rows, ``drop`` removes them).
        policies: ``data.on_*`` key -> ``warn`` / ``drop`` / ``error`` (defaults: :data:`DEFAULT_POLICIES`).

    Returns:
        ``(report, kept)``: ``report = {"rows": N, "kept": K, "dropped": N - K, "causes": {cause: {"rows": n,
        "example_row": i, "example": detail, "action": ...}}}`` (only causes with rows), and the indices of the
        rows kept, in order.

    Raises:
        ValueError: a cause whose policy is ``error`` has rows; names the cause, the count, an example row with
            its detail, and the key that lets the rows through.
    """
    policies = {**DEFAULT_POLICIES, **(policies or {})}
    per_cause: dict[str, list[int]] = {cause: [] for cause in CAUSES}
    example: dict[str, str] = {}
    drop = [False] * len(issues)
    for row, (row_issues, row_details) in enumerate(zip(issues, details)):
        found = list(zip(row_issues, row_details))
        if truncated[row]:
            found.append(("truncated", "longer than max_length"))
            drop[row] = truncation == "drop"
        if num_loss_tokens[row] == 0 and not drop[row]:
            found.append(("no_supervised_token", "no token of the row is supervised"))
            drop[row] = True
        for cause, detail in found:
            per_cause[cause].append(row)
            example.setdefault(cause, detail)
            if policies.get(POLICY_KEYS.get(cause, "")) == "drop":
                drop[row] = True
    causes: dict[str, Any] = {}
    for cause, rows in per_cause.items():
        if not rows:
            continue
        key = POLICY_KEYS.get(cause)
        action = policies[key] if key else truncation if cause == "truncated" else (
            "count" if cause == "boundary_moved" else "drop")
        causes[cause] = {"rows": len(rows), "example_row": rows[0], "example": example[cause], "action": action}
        if action == "error":
            raise ValueError(
                f"{split}: {len(rows)} row(s) with {cause} (e.g. row {rows[0]}: {example[cause]}). Fix the data, or "
                f"set `data.{key}: warn` (keep them) or `drop` (remove them)")
    kept = [row for row in range(len(issues)) if not drop[row]]
    return {"rows": len(issues), "kept": len(kept), "dropped": len(issues) - len(kept), "causes": causes}, kept


def report_lines(split: str, report: dict[str, Any], max_length: Optional[int]) -> list[str]:
    """Log lines: a summary, then one line per cause (count, action, example row and detail)."""
    lines = [f"{split}: {report['rows']} rows, {report['kept']} kept, {report['dropped']} dropped "
             f"(max_length={max_length})"]
    for cause, entry in report["causes"].items():
        lines.append(f"{split}: {cause}: {entry['rows']} row(s), {entry['action']} (e.g. row {entry['example_row']}: "
                     f"{entry['example']})")
    return lines


def _cell(value: Any) -> str:
    """A Markdown table cell: pipes escaped, line breaks flattened, long text cut."""
    text = " ".join(str(value).split()).replace("|", "\\|")
    return text if len(text) <= 120 else text[:117] + "..."


def report_markdown(reports: dict[str, dict[str, Any]], max_length: Optional[int]) -> list[str]:
    """Markdown lines for the model card: per split, the row counts and a table of the causes (rows, action, an
    example row and its detail). ``reports`` is ``SFTDataModule.preprocessing_report``."""
    lines: list[str] = []
    for split, report in reports.items():
        lines += [f"### {split}", "",
                  f"{report['rows']} rows, {report['kept']} kept, {report['dropped']} dropped (max_length={max_length}"
                  f"{', format ' + str(report['format']) if report.get('format') else ''}).", ""]
        if report["causes"]:
            lines += ["| cause | rows | action | example row | example |", "|---|---|---|---|---|"]
            lines += [f"| {cause} | {entry['rows']} | {entry['action']} | {entry['example_row']} | "
                      f"{_cell(entry['example'])} |" for cause, entry in report["causes"].items()]
            lines.append("")
    return lines
