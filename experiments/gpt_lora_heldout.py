"""Fine-tune the pretrained byte-level gpt (runs/gpt) on pydocs:heldout (lora).

    zoo train gpt --config experiments/gpt_lora_heldout.py --workdir runs/gpt_lora
    zoo eval gpt --workdir runs/gpt_lora
"""

from zoo import registry


def get_config():
    c = registry.get("gpt").config()
    c.data.name = "pydocs:heldout"    # held-out documents the pretrained model never saw, halved
    c.model.init_from = "runs/gpt"    # the pretrained run (its architecture is used)
    c.model.finetune = "lora"
    c.steps = 30          # the train half is 33 KB: 30 steps of 32 x 128 bytes is ~4 epochs
    c.log_every = 5
    c.ckpt_every = 30
    c.optimizer.warmup_steps = 5
    c.optimizer.weight_decay = 0.0
    c.optimizer.lr = 1e-3
    return c
