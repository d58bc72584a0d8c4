"""Train with LoRA as configured in conf/ (Hydra): the task is lora_lightning.app.train.train(cfg).

python scripts/train.py                                   # the main job: MiniLM + LoRA sentiment
python scripts/train.py lora.r=16 lora.alpha=32 trainer.max_steps=600
python scripts/train.py -m sweep=rank_alpha               # then: python scripts/sweep_report.py <multirun dir>
python scripts/train.py experiment=smollm2_lm             # causal-LM LoRA on SmolLM2-135M
python scripts/train.py debug=fast_dev_run                # one batch each way: does it run?
python scripts/train.py --cfg job                         # print the composed config
"""

from lora_lightning.app.train import main

if __name__ == "__main__":
    main()
