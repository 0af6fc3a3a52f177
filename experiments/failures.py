"""See topoopt.lab.studies.failures (also: topoopt failures --help)."""

import sys

from topoopt.lab.studies.failures import main

if __name__ == "__main__":
    main(sys.argv[1:])
