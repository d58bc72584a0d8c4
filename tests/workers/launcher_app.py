"""A tiny Hydra app for the gpu_pool launcher tests: records where and when each trial ran."""

import json
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import hydra
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig


@dataclass
class AppConfig:
    value: float = 1.0
    sleep: float = 0.5
    fail: str = "none"  # none | raise | exit | kill


ConfigStore.instance().store(name="launcher_app", node=AppConfig)


@hydra.main(version_base=None, config_name="launcher_app")
def main(cfg: AppConfig) -> float:
    record = {
        "value": cfg.value,
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "sweep_dir": os.environ.get("LORA_LIGHTNING_SWEEP_DIR"),
        "mode": str(HydraConfig.get().mode),
        "start": time.time(),
        "pid": os.getpid(),
    }
    time.sleep(cfg.sleep)
    record["end"] = time.time()
    Path(HydraConfig.get().runtime.output_dir, "record.json").write_text(json.dumps(record))
    if cfg.fail == "raise":
        raise ValueError(f"trial with value {cfg.value} failed on purpose")
    if cfg.fail == "exit":
        os._exit(3)
    if cfg.fail == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    return 2 * cfg.value


if __name__ == "__main__":
    main()
