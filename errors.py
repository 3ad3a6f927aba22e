"""User-facing errors: a wrong config, missing data, a corrupt checkpoint, a bad prompt.

Code anywhere raises UserError with one line saying what is wrong and how to fix it; the entry scripts turn it
into that line on stderr and exit code 2, with no traceback. Bugs still raise normally, with their traceback.
"""

import sys


class UserError(Exception):
    """A problem the user can fix; the message is shown as is."""


def run_cli(main) -> None:
    """Run an entry script's main() and turn a UserError into one line on stderr and exit code 2."""
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
