"""`python -m hammer ...`, the form torchrun launches (`torchrun ... -m hammer train ...`)."""
import sys

from hammer.cli import main

if __name__ == "__main__":
    sys.exit(main())
