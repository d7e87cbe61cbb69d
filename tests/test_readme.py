"""The README's promises stay true: its input table is generated from lib/params, its commands exist."""
import importlib.machinery
import importlib.util
import re

from conftest import ROOT


def _update_readme():
    loader = importlib.machinery.SourceFileLoader("update_readme", str(ROOT / "script/update-readme"))
    spec = importlib.util.spec_from_loader("update_readme", loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def test_readme_input_table_matches_the_declared_inputs():
    readme = (ROOT / "README.md").read_text()
    assert _update_readme().render(readme) == readme, "run script/update-readme"


def test_readme_commands_are_make_targets():
    readme = (ROOT / "README.md").read_text()
    makefile = (ROOT / "Makefile").read_text()
    assert "make test" in readme and "make predict ARGS=" in readme
    for target in ("test", "predict"):
        assert re.search(rf"^{target}:", makefile, re.M)
    assert "make test" in (ROOT / ".ci/run").read_text()
