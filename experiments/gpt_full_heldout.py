"""Fine-tune the pretrained byte-level gpt (runs/gpt) on pydocs:heldout (full).

    zoo train gpt --config experiments/gpt_full_heldout.py --workdir runs/gpt_full
    zoo eval gpt --workdir runs/gpt_full
"""

from zoo import registry


def get_config():
    c = registry.get("gpt").config()
    c.data.name = "pydocs:heldout"    # held-out documents the pretrained model never saw, halved
    c.model.init_from = "runs/gpt"    # the pretrained run (its architecture is used)
    c.model.finetune = ""
    c.steps = 30          # the train half is 33 KB: 30 steps of 32 x 128 bytes is ~4 epochs
    c.log_every = 5
    c.ckpt_every = 30
    c.optimizer.warmup_steps = 5
    c.optimizer.weight_decay = 0.0
    c.optimizer.lr = 1e-4
    return c
