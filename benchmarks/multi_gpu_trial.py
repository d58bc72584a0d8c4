"""One single-device training trial of the benchmark model, as a Hydra app: what benchmarks/multi_gpu.py packs
onto GPUs through the gpu_pool launcher. Writes trial.json (the run's record and its wall time) into the trial's
run folder and returns its tokens/s.

    python -m benchmarks.multi_gpu_trial -m trial=0,1,2,3 hydra/launcher=gpu_pool 'hydra.launcher.gpus=[0,1,2,3]'
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import hydra
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf

from benchmarks.multi_gpu import TRIAL_FILE, RunSpec, train


@dataclass
class TrialConfig(RunSpec):
    trial: int = 0  # only tells the trials of a sweep apart


ConfigStore.instance().store(name="multi_gpu_trial", node=TrialConfig)


@hydra.main(version_base=None, config_name="multi_gpu_trial")
def main(cfg: TrialConfig) -> float:
    values = OmegaConf.to_object(cfg)
    assert isinstance(values, TrialConfig)
    spec = RunSpec(**{k: v for k, v in asdict(values).items() if k != "trial"})
    start = time.time()
    record = train(spec, devices=1)
    assert record is not None
    record.update(trial=values.trial, start=start, end=time.time(), wall_s=time.time() - start)
    Path(HydraConfig.get().runtime.output_dir, TRIAL_FILE).write_text(json.dumps(record, indent=2))
    return record["tokens_per_s"]


if __name__ == "__main__":
    main()
