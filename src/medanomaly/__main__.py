import sys
from medanomaly.cli import main

sys.exit(main())
