import sys

from openweights.cli.main import main

sys.exit(main())
