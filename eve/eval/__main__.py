"""`python -m eve.eval`: evaluate an exported checkpoint on a benchmark (see eve.eval.runner)."""

import sys

from eve.eval.runner import main

if __name__ == "__main__":
    sys.exit(main())
