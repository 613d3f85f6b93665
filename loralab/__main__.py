import sys

from loralab.cli.main import main

sys.exit(main())
