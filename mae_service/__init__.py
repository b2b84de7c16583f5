"""mae-service: Masked Autoencoder pretraining of ViT encoders on Ray, tracked and registered in MLflow.

Layers, each importing only from those below it (checked by ``lint-imports`` in ``make test``)::

    cli                      the console script; each area registers its subcommands (``*/commands.py``)
    tune                     Ray Tune sweeps, built on the training driver's public API
    finetune                 fine-tuning registered encoders as classifiers on Ray Train; the results table
    train                    Ray Train pretraining: driver, per-worker loop, step, checkpoints, run logger
    tracking                 MLflow: runs, registry lookups and loading, registration, recorded evaluations
    evaluation               embeddings, k-NN, linear probes (no MLflow)
    runtime | config         starting Ray on loopback; the typed config (torch-free)
    data                     formats, storage, decoding, the Ray Data pipeline
    model                    the MAE, presets, export, pictures (torch + timm only)
"""
