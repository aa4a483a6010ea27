"""The ``espmedsam`` command: one module per verb group, each verb a thin call into the library.

``common`` holds the app, its command groups and what every verb shares; importing the verb modules
registers their commands on it.
"""

from espmedsam.cli import checkpoints, data, predict, serve, train  # noqa: F401  (register the verbs)
from espmedsam.cli.common import app

__all__ = ["app"]
