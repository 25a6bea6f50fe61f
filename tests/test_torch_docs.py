"""The PyTorch pages' examples run as written: every ```python block of docs/torch.md and docs/migration.md,
in order, in one namespace per page (the assertions in them are part of the test)."""

import pathlib
import re
import warnings

import pytest

DOCS = pathlib.Path(__file__).resolve().parents[1] / "docs"
# Each page, with names its examples must have defined: a sign that every block ran.
PAGES = {"torch.md": ("pack", "layer", "y_onnx", "optimizer"),
         "migration.md": ("pack", "pack_v1", "dcn", "fresh_is_a_convolution", "y_onnx", "program")}


@pytest.mark.parametrize("page", PAGES)
def test_python_examples_run(page):
    text = (DOCS / page).read_text()
    blocks = re.findall(r"^```python\n(.*?)^```", text, re.S | re.M)
    assert len(blocks) >= 4, f"{page} should show its examples in ```python blocks"
    namespace = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript exporter is deprecated
        exec(compile("\n".join(blocks), str(DOCS / page), "exec"), namespace)
    missing = [name for name in PAGES[page] if name not in namespace]
    assert not missing, f"{page}: the examples did not define {missing}"
