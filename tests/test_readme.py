"""The README's quick start runs as written (with a tiny loader and fewer epochs)."""

import re
from pathlib import Path

import torch

README = (Path(__file__).parent.parent / "README.md").read_text()


def test_quick_start_runs():
    block = re.search(r"## Quick start \(library\)\n\n```python\n(.*?)```", README, re.S).group(1)
    code = block.replace("range(120)", "range(2)").replace("ramp=(0, 30)", "ramp=(0, 1)")
    loader = [(torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,)))]
    namespace = {"loader": loader}
    exec(compile(code, "README quick start", "exec"), namespace)
    assert namespace["maxq"].check_nm(namespace["model"], 2, 4).ok


def test_links_point_into_the_repository():
    links = re.findall(r"\]\(([^)#]+)\)", README)
    assert "docs/index.md" in links and "docs/METHOD.md" in links
    missing = [
        link for link in links if not link.startswith("http") and not (Path(__file__).parent.parent / link).exists()
    ]
    assert not missing
