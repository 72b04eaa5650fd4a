"""``python -m softrank.study ...`` (see :func:`softrank.study.cli.cli_main`)."""
import sys

from .cli import cli_main

sys.exit(cli_main())
