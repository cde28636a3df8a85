"""What every KeySealer entry point shares: exit codes and the one-line error contract.

The error classes live in shared/errors.py; which exit code each ends a program with is decided here
alone, by EXIT_CODES, where the entry point catches it: the code that raises an error never picks one."""

import argparse
import datetime
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

from keysealer.shared.errors import BadPin, ConfigError, FatalError, FileRefused, UsageError
from keysealer.shared.log_text import printable

EXIT_OK = 0
EXIT_FAILURE = 1
# Bad usage, bad config, a socket already served: an operator must fix something; restarting won't help.
EXIT_USAGE = 2
# The token refused the PIN: retrying could lock it, so supervisors must not restart on this code.
EXIT_BAD_PIN = 3
# Far longer than any message of ours; what an operator passed in cannot stretch one beyond it.
MAX_ERROR_CHARS = 1000
# Each operator error class and the exit code it ends a program with; the first class that matches wins.
EXIT_CODES: tuple[tuple[type[Exception], int], ...] = (
    (BadPin, EXIT_BAD_PIN),
    (UsageError, EXIT_USAGE),
    (ConfigError, EXIT_USAGE),
    (FileRefused, EXIT_USAGE),
    (FatalError, EXIT_FAILURE),
)
OPERATOR_ERRORS = tuple(kind for kind, _ in EXIT_CODES)


def exit_code_for(error: Exception) -> int:
    """The exit code an operator error ends a program with (a worker's, too: the supervisor reads it)."""
    return next(code for kind, code in EXIT_CODES if isinstance(error, kind))


def error_for_exit_code(code: int, message: str) -> Exception:
    """The error that ends this program as a child's `code` ended the child: how a parent passes on a child's
    fatal exit (a bad PIN stays exit 3 through the broker and `keysealer dev`); any other code is a failure."""
    kind = next((kind for kind, known in EXIT_CODES if known == code), FatalError)
    return kind(message)


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser, reporting bad usage as one line (no usage block) with exit code 2."""

    def error(self, message: str) -> NoReturn:
        _say(self.prog, message)
        sys.exit(EXIT_USAGE)


def run_main(program: str, body: Callable[[], int]) -> NoReturn:
    """Run an entry point: operator errors become one line on stderr and an exit code, never a traceback."""
    try:
        code = body()
    except OPERATOR_ERRORS as exc:
        _say(program, str(exc))
        code = exit_code_for(exc)
    except OSError as exc:
        # A file or socket the environment did not provide: still one line, never a traceback.
        where = f"{exc.filename}: " if exc.filename else ""
        _say(program, f"{where}{exc.strerror or exc}")
        code = EXIT_FAILURE
    except KeyboardInterrupt:
        code = 130
    logging.shutdown()
    sys.exit(code)


def _say(program: str, message: str) -> None:
    # Messages quote what the operator gave (a key_id, a path): escaped, they stay one line.
    print(f"{program}: error: {printable(message, MAX_ERROR_CHARS)}", file=sys.stderr)


def run_service(program: str, description: str | None, serve: Callable[[Path], int]) -> NoReturn:
    """The entry point of a long-running process: `PROGRAM --config FILE [--verbose]`."""

    def body() -> int:
        parser = ArgumentParser(prog=program, description=description)
        parser.add_argument("--config", required=True, type=Path, help="YAML config file")
        parser.add_argument("--verbose", action="store_true", help="debug logging")
        parser.add_argument("--log-text", action="store_true", help="human-readable log lines instead of JSON")
        args = parser.parse_args()
        setup_logging(program, args.verbose, json_lines=not args.log_text)
        return serve(args.config)

    run_main(program, body)


class JsonLines(logging.Formatter):
    """One JSON object a line: what log collectors parse without configuration. Audit events add their
    fields under "audit"."""

    def __init__(self, program: str) -> None:
        super().__init__()
        self._program = program

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(timespec="milliseconds"),
            "program": self._program, "pid": record.process, "level": record.levelname.lower(),
            "logger": record.name, "message": record.getMessage(),
        }
        audit = getattr(record, "audit", None)
        if audit is not None:
            entry["audit"] = audit
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def setup_logging(program: str, verbose: bool = False, json_lines: bool = True) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonLines(program) if json_lines else logging.Formatter(
        f"%(asctime)s {program}[%(process)d] %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, handlers=[handler])
