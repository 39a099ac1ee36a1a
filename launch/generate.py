"""Sample text from a run's checkpoint.

    python launch/generate.py --run runs/NAME --prompt "def " [--max-new-tokens 200]
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dsgpt.errors import UserError  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="run dir written by launch/train.py (runs/NAME)")
    p.add_argument("--checkpoint", default="latest", help="latest, best, or a tag such as step0000200")
    p.add_argument("--prompt", default="", help="text to continue")
    p.add_argument("--max-new-tokens", type=int, default=200, help=">= 1 (default 200)")
    p.add_argument("--temperature", type=float, default=0.8, help=">= 0; 0 = greedy (default 0.8)")
    p.add_argument("--top-k", type=int, default=50, help=">= 0; 0 = off (default 50)")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling, in (0, 1]; default off")
    p.add_argument("--num-samples", type=int, default=1, help=">= 1 (default 1)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    try:
        from dsgpt.generate import generate_text
        texts = generate_text(args.run, args.prompt, args.max_new_tokens, args.temperature, args.top_k,
                              args.top_p, args.num_samples, args.seed, args.checkpoint)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for i, text in enumerate(texts):
        if len(texts) > 1:
            print(f"--- sample {i + 1} ---")
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
