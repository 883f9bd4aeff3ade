"""zoo: a JAX/Flax model zoo of generative models.

Math lives in `zoo.ops` (pure jax.numpy), layers in `zoo.nn`, models in `zoo.models`
(each a `ModelDef` of pure functions), and every model trains through `zoo.train.train`.
"""

__version__ = "0.1.0"
