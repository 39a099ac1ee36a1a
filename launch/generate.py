"""Sample text from a run's checkpoint: the same command, flags and exit codes as `dsgpt generate`.

    python launch/generate.py --run runs/NAME --prompt "def " [--max-new-tokens 200] [--greedy]
    python launch/generate.py --run runs/NAME --prompts-file prompts.jsonl --stop $'\n\n'   # bash: a blank line

Run `dsgpt generate --help` (or this script with --help) for every flag.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dsgpt import cli  # noqa: E402


def main(argv=None) -> int:
    return cli.main(["generate", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
