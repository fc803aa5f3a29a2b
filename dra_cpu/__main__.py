import sys

from dra_cpu.cli import main

sys.exit(main())
