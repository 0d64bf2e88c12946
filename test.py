"""Reference-compatible entry point: ``python test.py -c conf/... --resume CKPT [flags]``."""

import sys

from statten.cli import main

if __name__ == "__main__":
    sys.exit(main(["test", *sys.argv[1:]]))
