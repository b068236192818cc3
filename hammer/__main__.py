"""`python -m hammer ...`, the form torchrun launches (`torchrun ... -m hammer train ...`)."""
import sys

from hammer.cli import main

sys.exit(main())
