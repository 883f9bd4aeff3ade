"""The base config every model's default config starts from (ml_collections, configs as code).

Every field carries a comment; a model's config function overrides what it needs and fills `model`.
"""

import ml_collections


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.name = ""                 # the registered model this config trains (set by the registry)
    c.seed = 0                  # one seed drives init, data order and every step's key
    c.steps = 1000              # total optimizer steps (a resumed run continues up to this)
    c.batch_size = 128          # global batch, split over all devices of all processes
    c.parallel = "jit"          # jit (mesh data parallel) | fsdp (jit + sharded big params) | pmap
    c.fsdp_min_size = 2**16     # fsdp: params with at least this many elements are sharded
    c.log_every = 10            # write metrics.jsonl every N steps (the loop syncs on them)
    c.ckpt_every = 500          # save a checkpoint every N steps (and at the end and on SIGTERM)
    c.keep_checkpoints = 3      # how many recent checkpoints Orbax keeps
    c.ema_decay = 0.0           # EMA of params for sampling/eval; 0 turns it off

    c.data = ml_collections.ConfigDict()
    c.data.name = "digits"      # a source from zoo.data (digits, digits_binary, toy2d:moons, ...)
    c.data.seq_len = 128        # text sources: bytes per example
    c.data.shuffle = True       # a new order every epoch; False keeps the source's order

    c.optimizer = ml_collections.ConfigDict()
    c.optimizer.name = "adam"   # adam | adamw | sgd
    c.optimizer.lr = 1e-3       # peak learning rate
    c.optimizer.schedule = "constant"  # constant | cosine (decays to 0 at `steps`)
    c.optimizer.warmup_steps = 0       # linear warmup from 0
    c.optimizer.b1 = 0.9
    c.optimizer.b2 = 0.999
    c.optimizer.weight_decay = 0.0     # adamw only
    c.optimizer.momentum = 0.9         # sgd only
    c.optimizer.grad_clip = 0.0        # global-norm clipping; 0 turns it off

    c.eval = ml_collections.ConfigDict()
    c.eval.batch_size = 256     # `zoo eval` batch size over the test split
    c.eval.max_examples = 0     # 0 = the whole test split

    c.model = ml_collections.ConfigDict()  # the model's own hyperparameters (see its make_ fn)
    return c


def transformer_optimizer(c: ml_collections.ConfigDict, *, lr: float, warmup_steps: int,
                          weight_decay: float, b2: float = 0.999, grad_clip: float = 1.0) -> None:
    """The usual Transformer recipe in `c.optimizer`: AdamW, linear warmup, cosine decay, clipping."""
    c.optimizer.name = "adamw"
    c.optimizer.lr = lr
    c.optimizer.b2 = b2
    c.optimizer.weight_decay = weight_decay
    c.optimizer.schedule = "cosine"
    c.optimizer.warmup_steps = warmup_steps
    c.optimizer.grad_clip = grad_clip
