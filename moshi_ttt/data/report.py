"""Problems found in input data, collected instead of raised so a batch job can go on.

Every problem names the file (or manifest line) and says what is wrong and what was done about
it. Three actions:

- ``skipped``: the file is left out of the output;
- ``warning``: the file is kept but some of its content was dropped or altered (e.g. words
  aligned past the end of the audio);
- ``note``: a routine conversion that changes nothing the model sees (e.g. resampling).

With ``strict=True`` the first ``skipped`` or ``warning`` raises :class:`DataError` instead.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Literal

logger = logging.getLogger("moshi_ttt.data")

Action = Literal["skipped", "warning", "note"]


class DataError(Exception):
    """An input file (or manifest line) is unusable; the message names it and the problem."""

    def __init__(self, source: str, problem: str):
        super().__init__(f"{source}: {problem}")
        self.source = source
        self.problem = problem


@dataclass
class Issue:
    """One problem: where (``source``: a path or ``manifest.jsonl:LINE``), what, and what was done."""

    source: str
    problem: str
    action: Action = "skipped"
    # Short category used to group the summary ("corrupt audio", "mono", ...).
    kind: str = "other"

    def __str__(self) -> str:
        return f"[{self.action}] {self.source}: {self.problem}"


@dataclass
class Report:
    """Collects :class:`Issue` s; logs each once as it comes; ``summary()`` at the end.

    Args:
        strict: raise :class:`DataError` on the first issue whose action is not ``note``.
    """

    strict: bool = False
    issues: list[Issue] = field(default_factory=list)

    def add(self, source: str, problem: str, action: Action = "skipped", kind: str = "other") -> Issue:
        issue = Issue(str(source), problem, action, kind)
        if self.strict and action != "note":
            raise DataError(issue.source, f"{problem} (--strict)")
        self.issues.append(issue)
        level = logging.INFO if action == "note" else logging.WARNING
        logger.log(level, "%s", issue)
        return issue

    def extend(self, other: Report) -> None:
        self.issues.extend(other.issues)

    def by_action(self, action: Action) -> list[Issue]:
        return [i for i in self.issues if i.action == action]

    def __len__(self) -> int:
        return len(self.issues)

    def summary(self, total: int | None = None, kept: int | None = None) -> str:
        """Human-readable summary: counts per action and kind, then every non-note issue."""
        lines = []
        if total is not None and kept is not None:
            lines.append(f"{kept} of {total} inputs kept, {total - kept} skipped.")
        if not self.issues:
            lines.append("No problems found.")
            return "\n".join(lines)
        for action in ("skipped", "warning", "note"):
            items = self.by_action(action)  # type: ignore[arg-type]
            if not items:
                continue
            counts = Counter(i.kind for i in items)
            kinds = ", ".join(f"{k}: {n}" for k, n in counts.most_common())
            lines.append(f"{action}: {len(items)} ({kinds})")
            if action != "note":
                lines.extend(f"  - {i.source}: {i.problem}" for i in items)
        return "\n".join(lines)

    def to_json(self) -> list[dict]:
        return [asdict(i) for i in self.issues]
