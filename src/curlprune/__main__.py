"""``python -m curlprune ARGS``: the ``curlprune`` command (:func:`curlprune.cli.main`)."""
import sys

from curlprune.cli import main

if __name__ == "__main__":
    sys.exit(main())
