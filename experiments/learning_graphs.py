"""See topoopt.studies.learning_graphs (also: topoopt learning-graphs --help)."""

import sys

from topoopt.studies.learning_graphs import main

if __name__ == "__main__":
    main(sys.argv[1:])
