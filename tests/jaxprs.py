"""Walking a jaxpr into every nested program (pjit, custom_vjp, scan, cond bodies), for tests that
check what a function lowers to."""

import jax


def equations(jaxpr):
    """Every equation of a (closed) jaxpr and of the jaxprs inside its equations' params."""
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    for eqn in jaxpr.eqns:
        yield eqn
        for val in eqn.params.values():
            for sub in (val if isinstance(val, (list, tuple)) else [val]):
                sub = getattr(sub, "jaxpr", sub)
                if hasattr(sub, "eqns"):
                    yield from equations(sub)


def primitive_names(fn, *args) -> set:
    return {eqn.primitive.name for eqn in equations(jax.make_jaxpr(fn)(*args))}


def dot_operand_dtypes(fn, *args) -> list:
    """(lhs dtype, rhs dtype) of every dot_general fn(*args) runs."""
    return [tuple(str(v.aval.dtype) for v in eqn.invars) for eqn in equations(jax.make_jaxpr(fn)(*args))
            if eqn.primitive.name == "dot_general"]
