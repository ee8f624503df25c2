"""`python3 -m webknock.client` runs the client command line."""

import sys

from webknock.client.cli import main

sys.exit(main())
