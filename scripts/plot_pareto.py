"""Plot a study's frontier: `python scripts/plot_pareto.py` (same as `mobisearch plot ...`)."""

import sys

from mobisearch.cli import main

if __name__ == "__main__":
    sys.exit(main(["plot", *sys.argv[1:]]))
