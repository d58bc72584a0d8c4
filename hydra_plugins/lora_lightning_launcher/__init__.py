"""Hydra plugins shipped by lora-lightning: ``hydra/launcher=gpu_pool`` (``launcher=gpu_pool`` in conf/)."""

from hydra_plugins.lora_lightning_launcher.gpu_pool import GpuPoolLauncher, GpuPoolLauncherConf, ResultWriter

__all__ = ["GpuPoolLauncher", "GpuPoolLauncherConf", "ResultWriter"]
