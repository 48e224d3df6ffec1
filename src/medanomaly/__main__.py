import sys

from medanomaly.apps.cli import main

sys.exit(main())
