"""The plugin host: entry points from (fake) installed distributions, broken plugins, duplicates,
misspelled hooks, disabling, and API-version compatibility. Plugins are found by the real
importlib.metadata discovery in a subprocess whose sys.path holds the fake distributions."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import NOOP_STEP, make_dist, recipe_text
from conftest import site_cli as cli

from compressor import PLUGIN_API_VERSION


@pytest.fixture
def site(tmp_path: Path) -> Path:
    path = tmp_path / "site"
    path.mkdir()
    return path


def test_builtin_plugins_use_the_public_hooks():
    from compressor.host import build_host

    host = build_host(entry_points=[])
    assert {"finetune", "export-onnx", "quantize-onnx"} <= set(host.steps)
    assert host.step_provider["finetune"] == "finetune"
    assert host.evaluator_for("text-classification", "onnx") is host.evaluators[("text-classification", "*")]
    assert not host.broken


def test_entry_point_plugin_is_found_and_listed(site):
    make_dist(site, "fakeplug", "fakeplug_mod", NOOP_STEP.format(step="noop", hook="register_steps"))
    result = cli(site, "plugins", "--json")
    assert result.returncode == 0, result.stderr
    plugins = {p["name"]: p for p in json.loads(result.stdout)["plugins"]}
    assert plugins["fakeplug"]["distribution"] == "fakeplug"
    assert plugins["fakeplug"]["version"] == "1.0"
    assert plugins["fakeplug"]["steps"] == ["noop"]
    result = cli(site, "steps", "noop", "--json")
    assert json.loads(result.stdout)["provider"] == "fakeplug"


@pytest.mark.slow
def test_entry_point_step_runs_in_a_recipe(site, tmp_path, tiny_text_model, sst2_small):
    make_dist(site, "fakeplug", "fakeplug_mod", NOOP_STEP.format(step="noop", hook="register_steps"))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(recipe_text(tiny_text_model, None, sst2_small["eval"], "  - uses: noop\n"))
    result = cli(site, "run", str(recipe), "--out", str(tmp_path / "run"),
                 env={"COMPRESSOR_CACHE_DIR": str(tmp_path / "cache")})
    assert result.returncode == 0, result.stderr
    assert "fakeplug (fakeplug 1.0)" in result.stderr  # run says which plugins it loaded
    record = json.loads((tmp_path / "run" / "record.json").read_text())
    assert record["steps"][0]["provider"] == "fakeplug"
    assert record["artifacts"][0]["accuracy"] == record["artifacts"][1]["accuracy"]


def test_broken_plugin_is_named_and_does_not_take_the_host_down(site, tmp_path, tiny_text_model, sst2_small):
    make_dist(site, "brokenplug", "brokenplug_mod", "raise ImportError('needs libfoo')\n")
    result = cli(site, "plugins")
    assert result.returncode == 0
    assert "brokenplug" in result.stderr and "needs libfoo" in result.stderr
    assert "--disable-plugin brokenplug" in result.stderr and "COMPRESSOR_DISABLE_PLUGINS" in result.stderr
    assert "Traceback" not in result.stderr
    # A recipe that does not need it still checks (exit 0) ...
    ok = tmp_path / "ok.yaml"
    ok.write_text(recipe_text(tiny_text_model, sst2_small["train"], sst2_small["eval"], "  - uses: export-onnx\n"))
    assert cli(site, "check", str(ok)).returncode == 0
    # ... one that uses an unknown step exits 3 and names the broken plugin.
    bad = tmp_path / "bad.yaml"
    bad.write_text(recipe_text(tiny_text_model, sst2_small["train"], sst2_small["eval"], "  - uses: foo-step\n"))
    result = cli(site, "check", str(bad))
    assert result.returncode == 3, result.stderr
    assert "brokenplug" in result.stderr and "foo-step" in result.stderr
    # Disabled by flag or environment: no warning at all.
    assert "brokenplug" not in cli(site, "--disable-plugin", "brokenplug", "plugins").stderr
    assert "brokenplug" not in cli(site, "plugins", env={"COMPRESSOR_DISABLE_PLUGINS": "brokenplug"}).stderr


def test_duplicate_step_name_is_refused_with_both_providers(site):
    make_dist(site, "dupplug", "dupplug_mod", NOOP_STEP.format(step="finetune", hook="register_steps"))
    result = cli(site, "plugins", "--json")
    plugins = {p["name"]: p for p in json.loads(result.stdout)["plugins"]}
    assert plugins["dupplug"]["steps"] == []
    assert "registered twice" in plugins["dupplug"]["error"]
    assert "'finetune' (compressor)" in plugins["dupplug"]["error"] and "'dupplug' (dupplug)" in plugins["dupplug"]["error"]
    steps = json.loads(cli(site, "steps", "--json").stdout)
    assert next(s for s in steps if s["name"] == "finetune")["provider"] == "finetune"


def test_misspelled_hook_is_caught(site):
    make_dist(site, "typoplug", "typoplug_mod", NOOP_STEP.format(step="typo", hook="register_stepz"))
    result = cli(site, "plugins", "--json")
    plugins = {p["name"]: p for p in json.loads(result.stdout)["plugins"]}
    assert "register_stepz" in plugins["typoplug"]["error"]
    assert plugins["typoplug"]["steps"] == []


def test_hook_with_wrong_signature_is_caught(site):
    source = NOOP_STEP.format(step="sig", hook="register_steps").replace("def register_steps(register)",
                                                                          "def register_steps(register, extra)")
    make_dist(site, "sigplug", "sigplug_mod", source)
    plugins = {p["name"]: p for p in json.loads(cli(site, "plugins", "--json").stdout)["plugins"]}
    assert "extra" in plugins["sigplug"]["error"]


def test_incompatible_plugin_api_is_refused(site):
    source = NOOP_STEP.format(step="future", hook="register_steps") + "\nCOMPRESSOR_PLUGIN_API = '>=2,<3'\n"
    make_dist(site, "futureplug", "futureplug_mod", source)
    plugins = {p["name"]: p for p in json.loads(cli(site, "plugins", "--json").stdout)["plugins"]}
    assert ">=2,<3" in plugins["futureplug"]["error"] and PLUGIN_API_VERSION in plugins["futureplug"]["error"]


def test_step_class_without_config_is_refused():
    from compressor.host import build_host
    from compressor.hookspecs import hookimpl
    from compressor.step import Step
    from compressor.testing import register_plugin

    class NoConfig(Step):
        name, summary = "no-config", "bad"
        Config = dict  # type: ignore[assignment]

    class Plugin:
        @hookimpl
        def register_steps(self, register):
            register(NoConfig)

    host = build_host(entry_points=[])
    with pytest.raises(RuntimeError, match="Config that is not a compressor.step.StepConfig"):
        register_plugin(host, Plugin(), "bad-config")
    assert "no-config" not in host.steps


def test_cheap_commands_do_not_import_torch(tmp_path, tiny_text_model, sst2_small):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(recipe_text(tiny_text_model, sst2_small["train"], sst2_small["eval"],
                                  "  - uses: finetune\n  - uses: export-onnx\n  - uses: quantize-onnx\n"))
    probe = ("import sys, runpy; sys.argv = ['compressor'] + sys.argv[1:]\n"
             "try:\n    runpy.run_module('compressor', run_name='__main__')\n"
             "except SystemExit as e:\n    code = e.code\n"
             "heavy = [m for m in ('torch', 'transformers', 'onnxruntime', 'optimum', 'peft') if m in sys.modules]\n"
             "print('HEAVY=' + ','.join(heavy), file=sys.stderr)\n")
    for args in (["--help"], ["plugins"], ["steps"], ["check", str(recipe)]):
        result = subprocess.run([sys.executable, "-c", probe, *args], capture_output=True, text=True, timeout=60)
        assert "HEAVY=\n" in result.stderr or result.stderr.rstrip().endswith("HEAVY="), (args, result.stderr)


def _misbehaving(kind: str):
    """An inline plugin whose step breaks the contract in one way."""
    import shutil

    from compressor.hookspecs import hookimpl
    from compressor.step import Step, StepConfig

    class Bad(Step):
        name, summary, Config = f"bad-{kind}", "breaks the step contract", StepConfig

        def run(self, artifact, config, ctx):
            for f in artifact.path.iterdir():
                if f.is_file() and f.name != "artifact.json":
                    shutil.copy2(f, ctx.out_dir / f.name)
            if kind == "format":
                return artifact.derive(ctx.out_dir, format="onnx")
            if kind == "outside":
                (ctx.out_dir.parent.parent / "stray.txt").write_text("x")  # beside the run's artifacts
                return artifact.derive(ctx.out_dir)
            if kind == "input":
                (artifact.path / "config.json").write_text("{}")
            return artifact.derive(ctx.out_dir)

    class Plugin:
        @hookimpl
        def register_steps(self, register):
            register(Bad)

    return Plugin()


@pytest.mark.parametrize("kind, words", [
    ("format", "declared format 'hf' but returned 'onnx'"),
    ("input", "changed its input model"),
])
def test_a_step_that_breaks_the_contract_fails_naming_its_plugin(tmp_path, compressor_cache, tiny_text_model,
                                                                  sst2_small, kind, words):
    import shutil

    from compressor.models.artifact import hash_dir
    from compressor.errors import StepError
    from compressor.host import build_host
    from compressor.testing import register_plugin, run_recipe

    model = tmp_path / "model"
    shutil.copytree(tiny_text_model, model)
    host = build_host(entry_points=[])
    register_plugin(host, _misbehaving(kind), f"naughty-{kind}")
    # the bad step runs second, so that its input is an artifact of this run, not the user's model
    steps = f"  - uses: prune\n    with: {{ratio: 0.25}}\n  - uses: bad-{kind}\n"
    before = hash_dir(model)
    with pytest.raises(StepError) as info:
        run_recipe(recipe_text(model, sst2_small["train"], sst2_small["eval"], steps), tmp_path / "r", host=host)
    assert words in info.value.message and f"naughty-{kind}" in (info.value.where or "")
    assert hash_dir(model) == before
    # nothing half-made is left in the cache for the failed step
    assert not list(compressor_cache.rglob("*.tmp*"))


def test_a_step_that_writes_outside_its_directory_is_caught(tmp_path, compressor_cache, tiny_text_model, sst2_small):
    from compressor.errors import StepError
    from compressor.host import build_host
    from compressor.testing import register_plugin, run_recipe

    host = build_host(entry_points=[])
    register_plugin(host, _misbehaving("outside"), "naughty-outside")
    with pytest.raises(StepError) as info:
        run_recipe(recipe_text(tiny_text_model, sst2_small["train"], sst2_small["eval"], "  - uses: bad-outside\n"),
                   tmp_path / "r", host=host)
    # the message names the stray file (beside the cache's artifacts) and the plugin that wrote it
    assert "wrote outside its output directory" in info.value.message
    assert str(compressor_cache / "stray.txt") in info.value.message
    assert "naughty-outside" in (info.value.where or "")
