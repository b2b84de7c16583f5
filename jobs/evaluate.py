"""Ray job entry point: ``ray job submit --working-dir . -- python jobs/evaluate.py --config jobs/configs/X.yaml``.

Same as ``mae-service eval knn``: k-NN and linear-probe accuracy of a registered encoder (default
``models:/<registry.model_name>@<registry.alias>``) on ``data.train_uri`` / ``data.val_uri``, features on Ray Data,
logged to MLflow and recorded on the model version. Flags (``--model``, ``--train-data`` …) override the config.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the uploaded working dir's package comes first

from mae_service.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["eval", "knn", *sys.argv[1:]]))
