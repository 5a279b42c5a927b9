"""One way to state a numerical bound: the error relative to the size of what is compared.

An element-wise `rtol` / `atol` is blind to the scale of a sum: when terms of ~1 cancel to ~1e-2,
an absolute 1e-5 sits below float32 rounding of the terms, and the test passes on one CPU and
fails on another (AVX-512 and AVX2 sum in different orders). Here every leaf of a pytree is held
to

    max |actual - expected|  <=  rel * max |expected|

so `rel` reads as "agrees to this fraction of the leaf's largest value", whatever its units.
Each caller picks `rel` from the numerics it exercises (f32 rounding, bf16, FP8) and notes the
error it measured.

With `TOLERANCE_LOG=<file>` in the environment, each comparison appends the test, the leaf and
its measured ratio to that file, which is how the bounds in the suite were calibrated.
"""

import os

import jax
import numpy as np


def max_rel_error(actual, expected) -> float:
    """max |actual - expected| / max |expected| for one array (0 when both are all zero)."""
    a = np.asarray(actual, np.float64)
    e = np.asarray(expected, np.float64)
    err = float(np.max(np.abs(a - e), initial=0.0))
    scale = float(np.max(np.abs(e), initial=0.0))
    if err == 0.0:
        return 0.0
    return err / scale if scale > 0 else float("inf")


def assert_close_scaled(actual, expected, rel: float, *, err_msg: str = "") -> None:
    """Asserts, per leaf of two pytrees of the same structure and shapes, that the largest
    absolute difference is at most `rel` times the largest |expected| in that leaf."""
    a_paths, a_tree = jax.tree_util.tree_flatten_with_path(actual)
    e_leaves, e_tree = jax.tree_util.tree_flatten(expected)
    assert a_tree == e_tree, f"{err_msg} tree structures differ:\n{a_tree}\n{e_tree}"
    log = os.environ.get("TOLERANCE_LOG")
    failures = []
    for (path, a), e in zip(a_paths, e_leaves, strict=True):
        name = jax.tree_util.keystr(path) or "<array>"
        a, e = np.asarray(a), np.asarray(e)
        assert a.shape == e.shape, f"{err_msg} {name}: shapes {a.shape} != {e.shape}"
        ratio = max_rel_error(a, e)
        if log:
            test = os.environ.get("PYTEST_CURRENT_TEST", "?").split(" ")[0]
            with open(log, "a") as f:
                f.write(f"{test}\t{err_msg}{name}\t{ratio:.3g}\t{rel:.3g}\n")
        if not ratio <= rel:
            failures.append(f"{name}: max|diff| / max|expected| = {ratio:.3g} > {rel:.3g} "
                            f"(max|expected| = {np.max(np.abs(e), initial=0.0):.3g})")
    assert not failures, f"{err_msg}\n" + "\n".join(failures)
