"""``python -m diffq.worker [options]`` is ``diffq worker [options]``."""

import sys

from diffq.app.cli import main

if __name__ == "__main__":
    sys.exit(main(["worker", *sys.argv[1:]]))
