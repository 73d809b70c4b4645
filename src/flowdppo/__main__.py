import sys

from flowdppo.cli import main

sys.exit(main())
