"""`memscan`: the command-line face. Only this package parses arguments, prints and exits.

`common` holds what the commands share (options, output checks, building the scanner and its
threshold); each other module is one command or a group of them; `app` puts them together.
"""

from .app import build_parser, main
from .common import EXIT_FLAGGED, EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE

__all__ = ["EXIT_FLAGGED", "EXIT_INTERNAL", "EXIT_INTERRUPTED", "EXIT_OK", "EXIT_USAGE", "build_parser", "main"]
