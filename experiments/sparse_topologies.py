"""See topoopt.lab.studies.sparse_topologies (also: topoopt sparse --help)."""

import sys

from topoopt.lab.studies.sparse_topologies import main

if __name__ == "__main__":
    main(sys.argv[1:])
