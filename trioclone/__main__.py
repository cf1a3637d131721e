import sys

from trioclone.cli import main

sys.exit(main())
