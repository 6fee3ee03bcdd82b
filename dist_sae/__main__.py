import sys

from dist_sae.commands.main import main

sys.exit(main())
