"""
``python -m ilm.simulation``: run seeded chaos simulations of ILM.
"""

import sys

from ilm.simulation._runner import main

sys.exit(main())
