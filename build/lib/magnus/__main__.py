import sys

from magnus.cli import main

sys.exit(main())
