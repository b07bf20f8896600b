"""`llmup` and `python -m launcher`: the head start, then the command line.

`llmup serve` spawns the backend of the last launch of the same command before anything
else is imported (`backends.supervise.headstart`): the CLI, detection, planner and proxy
(~0.6 s on 2 cores) then import while the backend loads. The CLI is imported only after
that spawn, on purpose (not to dodge a cycle).
"""

from __future__ import annotations

import sys

from launcher.backends.supervise.headstart import begin


def main() -> None:
    head = begin(sys.argv[1:])
    try:
        from launcher.cli import main as cli_main  # after the spawn: see the docstring

        cli_main(head)
    finally:
        head.discard()  # a backend the serve pipeline did not take


if __name__ == "__main__":
    main()
