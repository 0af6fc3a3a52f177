"""See topoopt.lab.studies.ablate (also: topoopt ablate --help)."""

import sys

from topoopt.lab.studies.ablate import main

if __name__ == "__main__":
    main(sys.argv[1:])
