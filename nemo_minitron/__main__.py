import sys

from nemo_minitron.cli import main

sys.exit(main())
