"""What the reader CLIs (predict, evaluate, visualize, convert) share: exit codes, one-line errors.

Exit codes: 0 success; 1 a runtime failure (an input image that cannot be read, a test set that
fails while evaluating, an output that cannot be written); 2 a configuration error, found before
any work is done (a bad or missing flag, a checkpoint that is missing, damaged or does not fit
the model, an unknown model name, classes that differ from the dataset's, an output path that
is taken). Each error is one `error: ...` line on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn

EXIT_OK = 0
EXIT_RUNTIME = 1
EXIT_CONFIG = 2


def one_line(error: BaseException | str) -> str:
    """The message of `error` on one line (continuation lines joined with '; ')."""
    text = str(error).strip() or type(error).__name__
    return "; ".join(line.strip() for line in text.splitlines() if line.strip())


def fail(error: BaseException | str, code: int = EXIT_CONFIG) -> int:
    """Prints `error: <message>` as one line on stderr and returns `code`."""
    print(f"error: {one_line(error)}", file=sys.stderr)
    return code


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors are one `error: ...` line (exit 2) instead of usage + error."""

    def error(self, message: str) -> NoReturn:
        sys.exit(fail(f"{message} (see {self.prog} --help)", EXIT_CONFIG))
