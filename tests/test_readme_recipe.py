"""The README's "Adding a method" recipe works as written: one decorated function composing parts."""
import re
from pathlib import Path

import torch

import tta
from tta.methods import _REGISTRY


def test_readme_recipe_registers_and_filters(tiny_bn_model):
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = re.search(r"## Adding a method.*?```python\n(.*?)```", text, re.S).group(1)
    code = block.replace("from ..parts.filters", "from tta.parts.filters").replace(
        "from . import register", "from tta.methods import register").replace(
        "from .tent import tent_recipe", "from tta.methods.tent import tent_recipe")
    try:
        exec(compile(code, "README.md", "exec"), {})
        adapter = tta.wrap(tiny_bn_model, "tent_confident", margin_frac=0.01)
        x = torch.rand(16, 3, 8, 8)
        out = adapter.compute_loss(x)
        assert out.selected < 16  # a margin of 0.01 ln C keeps only near-certain samples
        assert "margin_frac" in tta.methods.method_options("tent_confident")
    finally:
        _REGISTRY.pop("tent_confident", None)
