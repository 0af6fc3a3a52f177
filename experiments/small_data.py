"""See topoopt.lab.studies.small_data (also: topoopt small-data --help)."""

import sys

from topoopt.lab.studies.small_data import main

if __name__ == "__main__":
    main(sys.argv[1:])
