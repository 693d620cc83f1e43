import sys

from prunery.cli import main

sys.exit(main())
