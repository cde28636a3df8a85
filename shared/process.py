"""What every KeySealer entry point shares: exit codes and the one-line error contract."""

import argparse
import datetime
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

from keysealer.shared.bounded_files import FileRefused
from keysealer.shared.config_loader import ConfigError
from keysealer.shared.log_text import printable

EXIT_OK = 0
EXIT_FAILURE = 1
# Bad usage, bad config, a socket already served: an operator must fix something; restarting won't help.
EXIT_USAGE = 2
# The token refused the PIN: retrying could lock it, so supervisors must not restart on this code.
EXIT_BAD_PIN = 3
# Far longer than any message of ours; what an operator passed in cannot stretch one beyond it.
MAX_ERROR_CHARS = 1000


class UsageError(Exception):
    """An operator mistake reported as one line with exit code 2."""


class FatalError(Exception):
    """A condition that stops the process with a given exit code and one line of explanation."""

    def __init__(self, message: str, exit_code: int = EXIT_FAILURE) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser, reporting bad usage as one line (no usage block) with exit code 2."""

    def error(self, message: str) -> NoReturn:
        _say(self.prog, message)
        sys.exit(EXIT_USAGE)


def run_main(program: str, body: Callable[[], int]) -> NoReturn:
    """Run an entry point: operator errors become one line on stderr and an exit code, never a traceback."""
    try:
        code = body()
    except (ConfigError, UsageError, FileRefused) as exc:
        _say(program, str(exc))
        code = EXIT_USAGE
    except FatalError as exc:
        _say(program, str(exc))
        code = exc.exit_code
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
