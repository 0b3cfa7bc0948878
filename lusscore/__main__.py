import sys

from lusscore.cli import main

sys.exit(main())
