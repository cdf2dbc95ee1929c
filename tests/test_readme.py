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


def test_the_layout_names_every_module_config_benchmark_and_script():
    # Issue 27: the layout had fallen behind the tree.
    root = Path(__file__).parent.parent
    layout = re.search(r"## Layout\n.*?```\n(.*?)```", README, re.S).group(1)
    words = set(re.findall(r"[\w.]+", layout))
    expected = {p.name for p in (root / "src" / "maxq").rglob("*.py") if not p.name.startswith("__")}
    expected |= {p.name for folder in ("benchmarks", "scripts", "examples") for p in (root / folder).iterdir()}
    missing = sorted(name for name in expected if name not in words and name.removesuffix(".py") not in words)
    missing += sorted(p.stem for p in (root / "configs").glob("*.yaml") if p.stem not in words)
    assert not missing, f"the README's layout does not name {missing}"
