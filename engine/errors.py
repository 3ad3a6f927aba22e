"""User-facing errors: a wrong config, missing data, a corrupt checkpoint, a bad prompt.

Code anywhere raises UserError with one line saying what is wrong and how to fix it; the entry scripts turn it
into that line on stderr and exit code 2, with no traceback. Bugs still raise normally, with their traceback.
Ctrl-C (KeyboardInterrupt) is one line too, with exit code 130.
"""

import sys

# Exit codes of train.py, sample.py and prepare/ (documented in README.md).
EXIT_USER_ERROR = 2  # a UserError: fix what the message says and run again
EXIT_NONFINITE = 3  # training stopped after too many consecutive non-finite steps; no bad checkpoint was written
EXIT_PREEMPTED = 75  # SIGTERM/SIGUSR1: a checkpoint was saved; run again with --init_from=resume (EX_TEMPFAIL)
EXIT_INTERRUPTED = 130  # Ctrl-C (SIGINT) or SIGHUP: as 75 after one; a second Ctrl-C stops at once (128 + SIGINT)


class UserError(Exception):
    """A problem the user can fix; the message is shown as is."""


def run_cli(main) -> None:
    """Run an entry script's main(): exit with the code it returns (0 for None or a result), and turn a UserError
    into one line on stderr and exit code 2."""
    try:
        code = main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(EXIT_USER_ERROR) from None
    except KeyboardInterrupt:
        print(
            "error: interrupted; nothing half-written was kept (files are written whole or not at all)", file=sys.stderr
        )
        raise SystemExit(EXIT_INTERRUPTED) from None
    raise SystemExit(code if isinstance(code, int) else 0)  # main() may return a result for in-process callers
