"""See topoopt.lab.studies.steer (also: topoopt steer --help)."""

import sys

from topoopt.lab.studies.steer import main

if __name__ == "__main__":
    main(sys.argv[1:])
