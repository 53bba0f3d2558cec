import sys

from edgeward.cli import main

sys.exit(main())
