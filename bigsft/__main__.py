import sys

from bigsft.cli import main

sys.exit(main())
