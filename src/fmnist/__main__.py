import sys

from fmnist.cli import console

sys.exit(console())
