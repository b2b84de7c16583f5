"""Ray job entry point: ``ray job submit --working-dir . -- python jobs/finetune.py --model models:/NAME@ALIAS
--train-data URI --val-data URI [--blocks K] [--from-scratch] [--epochs N] [--json FILE] [--config FILE] [KEY=VALUE ...]``.

Same as ``mae-service eval finetune``: fine-tunes the registered encoder as a timm ViT classifier on Ray Train
(the cluster the job runs in), registers the classifier and records its top-1 on the source version. Resubmitting
with the same ``finetune.run_name`` continues from its last checkpoint.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the uploaded working dir's package comes first

from mae_service.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["eval", "finetune", *sys.argv[1:]]))
