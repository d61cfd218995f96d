"""`python -m pocketdiff`."""

import sys

try:
    from .cli import main
except KeyboardInterrupt:  # Ctrl-C in the milliseconds before main() installs its handlers
    print("pocketdiff: stopped: interrupted", file=sys.stderr)
    sys.exit(130)

sys.exit(main())
