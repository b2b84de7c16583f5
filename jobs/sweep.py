"""Ray job entry point: ``ray job submit --working-dir . -- python jobs/sweep.py --config jobs/configs/X.yaml``."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the uploaded working dir's package comes first

from mae_service.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["sweep", *sys.argv[1:]]))
