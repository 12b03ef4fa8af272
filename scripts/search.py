"""Run a search: `python scripts/search.py --budget 20M` (same as `mobisearch search ...`)."""

import sys

from mobisearch.cli import run

if __name__ == "__main__":
    run(["search", *sys.argv[1:]])
