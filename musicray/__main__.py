import sys

from musicray.cli import main

sys.exit(main())
