"""What `keysealer doctor` checks produce, and the order they run in: a check whose prerequisite did not
pass is skipped with the reason, so one broken link does not bury the report in follow-up failures."""

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from enum import StrEnum


class Verdict(StrEnum):
    PASS = "PASS"
    WARN = "WARN"  # works, but something deserves a look
    FAIL = "FAIL"
    SKIP = "SKIP"  # not run: a check it needs did not pass


@dataclass(frozen=True)
class Outcome:
    verdict: Verdict
    message: str
    fix: str | None = None
    details: Sequence[str] = ()  # further lines: one per slot, key, ...


def passed(message: str, details: Sequence[str] = ()) -> Outcome:
    return Outcome(Verdict.PASS, message, details=details)


def warned(message: str, fix: str | None = None, details: Sequence[str] = ()) -> Outcome:
    return Outcome(Verdict.WARN, message, fix, details)


def failed(message: str, fix: str | None, details: Sequence[str] = ()) -> Outcome:
    return Outcome(Verdict.FAIL, message, fix, details)


@dataclass(frozen=True)
class Check:
    name: str
    run: Callable[[], Outcome]
    needs: tuple[str, ...] = field(default=())  # names of checks that must pass (or warn) first


@dataclass(frozen=True)
class Finding:
    name: str
    outcome: Outcome


def run_checks(checks: Sequence[Check]) -> Iterator[Finding]:
    """Each check's finding as soon as it is known: a module that hangs still shows how far it got."""
    verdicts: dict[str, Verdict] = {}
    for check in checks:
        blocked = [name for name in check.needs if verdicts.get(name) not in (Verdict.PASS, Verdict.WARN)]
        if blocked:
            outcome = Outcome(Verdict.SKIP, f"skipped: needs {', '.join(blocked)}, which did not pass")
        else:
            outcome = check.run()
        verdicts[check.name] = outcome.verdict
        yield Finding(check.name, outcome)


NAME_WIDTH = 16
DETAIL_INDENT = " " * (len("PASS  ") + NAME_WIDTH + 1)


def render(finding: Finding) -> str:
    outcome = finding.outcome
    line = f"{outcome.verdict}  {finding.name:<{NAME_WIDTH}} {outcome.message}"
    if outcome.fix:
        line += f" -> fix: {outcome.fix}"
    return "\n".join([line, *(DETAIL_INDENT + detail for detail in outcome.details)])
