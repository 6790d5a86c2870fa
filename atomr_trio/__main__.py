"""`python -m atomr_trio`: serve the OpenAI-compatible API (see `--help`; the parser is cli.py)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
