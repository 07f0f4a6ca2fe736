import sys

from edgeoffload.cli import main

sys.exit(main())
