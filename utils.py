"""Leaf helpers shared by the scripts; nothing here imports from the project."""
import sys


def die(message):
    """End the program on bad input: one line on stderr, exit code 2, no traceback."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)
