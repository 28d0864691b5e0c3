import sys

from dermfast.pipeline import main

sys.exit(main())
