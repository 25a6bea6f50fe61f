"""The README's usage examples run as written."""

import pathlib
import re

import numpy as np

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_readme_usage_examples_run():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert len(blocks) >= 2, "the README should show a NumPy example and a framework example"
    namespace = {}
    exec(compile("\n".join(blocks), str(README), "exec"), namespace)
    y, grads = namespace["y"], namespace["grads"]
    assert y.shape == (2, 32, 32, 32) and np.isfinite(y).all()
    assert grads.grad_offset.shape == namespace["offset"].shape
    assert namespace["xt"].grad is not None and namespace["xt"].grad.shape == namespace["xt"].shape
    assert namespace["grad_w"].shape == namespace["weight"].shape
