import sys

from rawformer.cli import main

sys.exit(main())
