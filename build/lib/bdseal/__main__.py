import sys

from bdseal.cli import main

sys.exit(main())
