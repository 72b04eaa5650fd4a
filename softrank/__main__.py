"""``python -m softrank demo`` — same as the ``softrank`` console script."""
import sys

from .cli import main

sys.exit(main())
