"""Reference-compatible entry point: ``python train.py -c conf/... [reference flags]``."""

import sys

from statten.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
