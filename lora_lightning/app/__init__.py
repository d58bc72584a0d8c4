"""The Hydra + W&B training app (``pip install 'lora-lightning[app]'``): ``train`` runs one fine-tune from the
configs in ``conf/``, ``sweep_report`` summarises a sweep. The library (`lora_lightning`) never imports it."""
