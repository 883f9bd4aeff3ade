import ml_collections
import pytest

from zoo.errors import ConfigError
from zoo.train.overrides import apply_overrides


def cfg():
    c = ml_collections.ConfigDict({"steps": 10, "lr": 1e-3, "flag": False, "name": "adam",
                                   "hidden": (4, 5), "sub": {"k": 2}})
    return c


def test_types_follow_the_replaced_value():
    c = apply_overrides(cfg(), ["steps=20", "lr=3", "flag=true", "name=sgd", "hidden=(8,9,10)",
                                "sub.k=7", "steps=1e2"])
    assert c.steps == 100 and isinstance(c.steps, int)
    assert c.lr == 3.0 and isinstance(c.lr, float)
    assert c.flag is True and c.name == "sgd" and c.hidden == (8, 9, 10) and c.sub.k == 7
    assert apply_overrides(cfg(), ["hidden=16"]).hidden == (16,)


@pytest.mark.parametrize("item, msg", [
    ("stepz=3", "valid: flag, hidden, lr, name, steps, sub"),
    ("sub.q=1", "valid: k"),
    ("steps.x=1", "not a group"),
    ("steps=1.5", "expected int"),
    ("flag=maybe", "expected a bool"),
    ("sub=3", "is a group"),
    ("noequals", "expected key=value"),
    ("steps=True", "expected int"),
])
def test_bad_overrides(item, msg):
    with pytest.raises(ConfigError, match=msg):
        apply_overrides(cfg(), [item])
