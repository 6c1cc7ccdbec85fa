"""``python -m services.blockstore``: the block store server's command line."""
import sys

from services.blockstore.server import main

sys.exit(main())
