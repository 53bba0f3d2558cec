import sys

from edgeward.cli import main

if __name__ == "__main__":  # not when a multiprocessing child imports the main module again
    sys.exit(main())
