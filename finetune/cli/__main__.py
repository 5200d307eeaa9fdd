"""`python -m finetune.cli`: the same command as `finetune`."""

import sys

from finetune.cli.main import main

sys.exit(main())
