"""``python -m clbench.sweep.child RUN_DIR``: the run, in the process a sweep started.

It resumes the folder the sweep prepared (its config.json is written first), which is
``clbench run --resume RUN_DIR`` without the command-line layer: the sweep never imports
the CLI, and the exit codes are the CLI's (0 done, 2 bad input, 130 interrupted, 1 an
error, with its traceback in sweep.log).
"""

from __future__ import annotations

import sys
from pathlib import Path

from clbench.errors import UsageError
from clbench.sweep.jobs import die_with_parent


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m clbench.sweep.child RUN_DIR", file=sys.stderr)
        return 2
    die_with_parent()
    from clbench.results import RunFolder
    from clbench.runner import execute

    try:
        execute(RunFolder(Path(argv[0])), resume=True)
    except UsageError as error:
        print(f"clbench: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
