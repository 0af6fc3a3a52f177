"""See topoopt.lab.studies.learning_graphs (also: topoopt learning-graphs --help)."""

import sys

from topoopt.lab.studies.learning_graphs import main

if __name__ == "__main__":
    main(sys.argv[1:])
