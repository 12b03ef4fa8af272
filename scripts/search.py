"""Run a search: `python scripts/search.py --budget 20M` (same as `mobisearch search ...`)."""

import sys

from mobisearch.cli import main

if __name__ == "__main__":
    sys.exit(main(["search", *sys.argv[1:]]))
