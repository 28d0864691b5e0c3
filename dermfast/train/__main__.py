import sys

from dermfast.train.cli import main

sys.exit(main())
