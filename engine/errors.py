"""User-facing errors: a wrong config, missing data, a corrupt checkpoint, a bad prompt.

Code anywhere raises UserError with one line saying what is wrong and how to fix it; the entry scripts turn it
into that line on stderr and exit code 2, with no traceback. Bugs still raise normally, with their traceback.
Ctrl-C (KeyboardInterrupt) is one line too, with exit code 130, at any moment of a command (engine/interrupts.py).
"""

from engine.interrupts import EXIT_INTERRUPTED, MESSAGE, end_process, interrupted, stop_now

import sys

# Exit codes of train.py, sample.py and prepare/ (documented in README.md).
EXIT_USER_ERROR = 2  # a UserError: fix what the message says and run again
EXIT_NONFINITE = 3  # training stopped after too many consecutive non-finite steps; no bad checkpoint was written
EXIT_PREEMPTED = 75  # SIGTERM/SIGUSR1: a checkpoint was saved; run again with --init_from=resume (EX_TEMPFAIL)
# EXIT_INTERRUPTED = 130 (engine/interrupts.py): Ctrl-C or SIGHUP; as 75 after one; a second Ctrl-C stops at once
EXIT_BROKEN_PIPE = 141  # what a shell reports for a command killed by SIGPIPE (Python ignores the signal instead)


class UserError(Exception):
    """A problem the user can fix; the message is shown as is."""


def run_cli(main) -> None:
    """Run an entry script's main() and exit with the code it returns (0 for None or a result). A UserError is one
    line on stderr and exit code 2; Ctrl-C, or an error raised while unwinding from one, is one line and 130.

    Called by the script being run (`if __name__ == "__main__": run_cli(main)`), it ends the process through
    engine/interrupts.py end_process, never the interpreter's finalization (which can abort, see there), and a bug
    is its traceback and exit code 1. Called in-process (tests), it raises SystemExit, and a bug raises as is."""
    script = getattr(main, "__module__", None) == "__main__"
    try:
        result = main()
    except BaseException as e:
        if script and interrupted(e):
            stop_now()  # the with-blocks have undone half-done work; nothing is left to run
        if not script and not interrupted(e) and not isinstance(e, UserError):
            raise  # in-process: a bug, or prepare's SystemExit, goes to the caller as it is
        code = _reported(e)
    else:
        code = result if isinstance(result, int) else 0  # main() may return a result for in-process callers
    if script:
        end_process(code)
    raise SystemExit(code)


def _reported(e: BaseException) -> int:
    """The exit code for what ended main(), once its line (or traceback) is on stderr."""
    if interrupted(e):
        print(f"error: {MESSAGE}", file=sys.stderr)
        return EXIT_INTERRUPTED
    if isinstance(e, UserError):
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    if isinstance(e, BrokenPipeError):  # stdout's reader left (`| head`): quietly, as `yes | head` does
        return EXIT_BROKEN_PIPE
    if isinstance(e, SystemExit):  # prepare's fail(): its line is on stderr already
        if e.code is None or isinstance(e.code, int):
            return e.code or 0
        print(e.code, file=sys.stderr)
        return 1
    sys.excepthook(type(e), e, e.__traceback__)  # a bug: the traceback, as Python prints it
    return 1
