"""
``python -m ilm``: the ``ilm`` command.
"""

import sys

from ilm._cli import main

sys.exit(main())
