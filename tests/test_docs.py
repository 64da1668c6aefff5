"""docs/plugins.md documents every hook with its exact signature, and the README's plugin example works."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

from compressor import hookspecs

DOCS = Path(__file__).resolve().parent.parent / "docs" / "plugins.md"


def _signature(fn) -> str:
    sig = inspect.signature(fn)
    params = ", ".join(f"{p.name}: {p.annotation}".replace("'", "") for p in sig.parameters.values())
    return f"def {fn.__name__}({params}) -> {sig.return_annotation}"


def test_every_hookspec_is_documented_with_its_signature():
    text = DOCS.read_text(encoding="utf-8")
    documented = dict(re.findall(r"^def (\w+)(\(.*\) -> .*)$", text, flags=re.M))
    specs = [getattr(hookspecs, n) for n in dir(hookspecs) if hasattr(getattr(hookspecs, n), "compressor_spec")]
    assert {s.__name__ for s in specs} == {"register_steps", "register_evaluators", "register_tasks", "register_commands",
                                           "load_hf_model", "convert_input_model", "load_forward", "step_started", "step_finished", "run_finished",
                                           "register_formats"}
    for spec in specs:
        assert spec.__name__ in documented, f"{spec.__name__} is missing from docs/plugins.md"
        assert f"def {spec.__name__}{documented[spec.__name__]}" == _signature(spec), spec.__name__
        assert f"### {spec.__name__}" in text


def test_the_plugin_example_registers(tmp_path):
    """The plugin example of docs/plugins.md, as written there, registers its step."""
    page = DOCS.read_text(encoding="utf-8")
    code = re.search(r"```python\n(# my_package/my_step.py\n.*?)```", page, flags=re.S).group(1)
    module = tmp_path / "readme_plugin.py"
    module.write_text(code)
    import importlib.util

    from compressor.host import build_host
    from compressor.testing import register_plugin

    spec = importlib.util.spec_from_file_location("readme_plugin", module)
    plugin = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(plugin)
    host = build_host(entry_points=[])
    register_plugin(host, plugin, "readme")
    assert host.steps["copy"].summary == "Copy the model unchanged."


def test_readme_cli_table_lists_every_command():
    from compressor.cli import cli

    readme = (DOCS.parent.parent / "README.md").read_text(encoding="utf-8")
    table = readme[readme.index("## The CLI"):readme.index("## Steps")]
    missing = [name for name in cli.commands if f"| `compressor {name}" not in table]
    assert not missing, f"README's CLI table lacks {missing}"


def test_doc_paths_exist():
    """Every source path the README and docs/ point a reader at exists in the source tree."""
    root = DOCS.parent.parent
    for page in [root / "README.md", root / "CONTRIBUTING.md", *sorted(DOCS.parent.glob("*.md"))]:
        text = page.read_text(encoding="utf-8")
        for path in re.findall(r"`((?:compressor|plugins|export|bench|tests|recipes|examples|docs)/[\w./-]*)`", text):
            assert (root / path.rstrip("/")).exists() or "*" in path, f"{page.name} points at {path}, which does not exist"


def test_docs_keep_no_diary_and_no_machine_paths():
    """The product speaks of the product: no session diary, no one machine's run directories or absolute paths."""
    root = DOCS.parent.parent
    pages = [root / "README.md", root / "CONTRIBUTING.md", *sorted(DOCS.parent.glob("*.md")),
             *sorted((root / "bench").rglob("*.py")), *sorted((root / "recipes").glob("*.yaml"))]
    diary = re.compile(r"[Ss]essions? [0-9]|(this|last|earlier|next|previous) session|runs/smollm2")
    machine = re.compile(r"(?<![\w.~])/(work|root|home|tmp)/")
    for page in pages:
        text = page.read_text(encoding="utf-8")
        assert not diary.search(text), f"{page.relative_to(root)}: {diary.search(text).group(0)!r}"
        assert not machine.search(text), f"{page.relative_to(root)}: an absolute path {machine.search(text).group(0)!r}"


def test_readme_is_a_short_guide():
    readme = (DOCS.parent.parent / "README.md").read_text(encoding="utf-8")
    assert len(readme) <= 12_000, f"README.md has {len(readme)} characters; move detail into docs/"


def test_step_reference_is_current(cli_run):
    """docs/steps.md is what `compressor steps --markdown` prints now (regenerate it when a step changes)."""
    code, out, _ = cli_run("steps", "--markdown")
    assert code == 0
    page = (DOCS.parent / "steps.md").read_text(encoding="utf-8")
    assert out == page, "docs/steps.md is stale: run `compressor steps --markdown > docs/steps.md`"
    assert "| `block_size` |" in page and "## `quantize-onnx`" in page
