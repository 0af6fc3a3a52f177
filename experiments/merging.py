"""See topoopt.lab.studies.merging (also: topoopt merging --help)."""

import sys

from topoopt.lab.studies.merging import main

if __name__ == "__main__":
    main(sys.argv[1:])
