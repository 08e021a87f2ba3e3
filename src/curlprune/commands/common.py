"""What the command modules share."""
from __future__ import annotations

NO_DEFAULT = "%(default).0s"  # formats to nothing: stops the help formatter from adding "(default: None)"
