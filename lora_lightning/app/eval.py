"""Evaluate a saved adapter on the held-out split without training (``conf/eval.yaml``)::

python -m lora_lightning.app.eval adapter_path=logs/train/runs/<time>/adapter
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from lora_lightning.app.train import CONF_DIR
from lora_lightning.app.train import main as train_main


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="eval")
def main(cfg: DictConfig) -> float | None:
    """The ``lora-lightning-eval`` entry: `lora_lightning.app.train.main` on the eval config."""
    return train_main.__wrapped__(cfg)


if __name__ == "__main__":
    main()
