"""See topoopt.lab.studies.stopping (also: topoopt stopping --help)."""

import sys

from topoopt.lab.studies.stopping import main

if __name__ == "__main__":
    main(sys.argv[1:])
