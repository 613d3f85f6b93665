"""The package's layout limits (issue 18), checked by `scripts/check_layout.py`.

The first tests hold loralab itself to the limits; each failure lists the offenders. The
rest check the checker on small synthetic packages written to tmp_path.
"""

from __future__ import annotations

import importlib.util
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _load_checker():
    spec = importlib.util.spec_from_file_location("check_layout", REPO / "scripts/check_layout.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while being created
    spec.loader.exec_module(module)
    return module


cl = _load_checker()


def _listing(items: list[str]) -> str:
    return "\n    " + "\n    ".join(items)


def _expect_none(offenders: list[str], title: str) -> None:
    """Fail with one line per offender (no repr of the whole report)."""
    if offenders:
        pytest.fail(f"{title}:" + _listing(offenders), pytrace=False)


@pytest.fixture(scope="module")
def report():
    return cl.check(cl.read_layout(REPO / "loralab", display_root=REPO))


# ------------------------------------------------------------------------ loralab itself
def test_every_file_parses(report):
    _expect_none(report.syntax_errors, "files that do not parse")


def test_no_module_over_the_line_limit(report):
    _expect_none(report.long_modules, f"modules over {cl.LIMITS.module_lines} lines")


def test_no_function_over_the_line_limit(report):
    _expect_none(report.long_functions, f"functions over {cl.LIMITS.function_lines} lines")


def test_no_import_cycles(report):
    assert cl.LIMITS.cycles == 0
    _expect_none(report.cycles, "import cycles (module-level imports)")


def test_in_function_imports_of_the_package_within_budget(report):
    found, budget = report.infunction_imports, cl.LIMITS.infunction_imports
    if len(found) > budget:
        pytest.fail(f"{len(found)} in-function imports of loralab's modules, at most {budget}; "
                    "move them to module top:" + _listing(found), pytrace=False)


def test_imports_follow_the_layer_order(report):
    _expect_none(report.layer_violations,
                 "imports against the layer order (see LAYERS in scripts/check_layout.py)")


def test_torch_free_modules_do_not_import_torch(report):
    _expect_none(report.torch_free_violations,
                 "torch-free modules that import torch or transformers")


# ------------------------------------------------------------------------ the checker
def _package(tmp_path: Path, files: dict[str, str], root: str = "toy") -> Path:
    """Write a package `root` with the given files (paths relative to it) and every __init__."""
    pkg = tmp_path / root
    for rel, source in {"__init__.py": "", **files}.items():
        path = pkg / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        for parent in path.relative_to(pkg).parents:
            (pkg / parent / "__init__.py").touch()
        path.write_text(textwrap.dedent(source))
    return pkg


TOY_LAYERS = (("base", ("__init__", "errors")), ("low", ("low",)), ("high", ("high",)))


def _check(pkg: Path, **kw):
    kw.setdefault("layers", TOY_LAYERS)
    kw.setdefault("torch_free", ())
    return cl.check(cl.read_layout(pkg), **kw)


def test_a_clean_package_passes_and_main_exits_0(tmp_path, capsys):
    pkg = _package(tmp_path, {
        "errors.py": "class Bad(Exception): ...\n",
        "low/a.py": "from toy.errors import Bad\nimport json\n",
        "high/b.py": "from toy.low import a\nfrom ..errors import Bad\nfrom . import c\n",
        "high/c.py": "import toy.low.a\n",
    })
    rep = _check(pkg)
    assert rep.failures() == {}
    assert rep.infunction_imports == [] and rep.cycles == []
    # main uses the real layer table; this toy's names are not in it
    assert cl.main([str(pkg)]) == 1
    assert "is in no layer" in capsys.readouterr().out


def test_a_cycle_is_found_and_type_checking_or_in_function_imports_do_not_make_one(tmp_path):
    pkg = _package(tmp_path, {
        "low/a.py": "from toy.low import b\n",
        "low/b.py": "from . import c\n",
        "low/c.py": "import toy.low.a\n",
        "low/d.py": "from typing import TYPE_CHECKING\nfrom toy.low import e\n"
                    "if TYPE_CHECKING:\n    from toy.low import f\n",
        "low/e.py": "from typing import TYPE_CHECKING\n"
                    "if TYPE_CHECKING:\n    from toy.low.d import X\n",
        "low/f.py": "def later():\n    from toy.low import d\n",
    })
    rep = _check(pkg)
    assert rep.cycles == ["toy.low.a -> toy.low.b -> toy.low.c -> toy.low.a"]
    assert "import cycles" in rep.failures()
    assert rep.infunction_imports == ["toy/low/f.py:2 toy.low.f -> toy.low.d"]


def test_import_cycles_on_a_plain_graph():
    graph = {"a": {"b"}, "b": {"c", "a"}, "c": {"a"}, "d": {"e"}, "e": set(), "f": {"f"}}
    assert cl.import_cycles(graph) == [["a", "b", "a"]]
    assert cl.import_cycles({"x": {"y"}, "y": {"z"}, "z": set()}) == []


def test_long_functions_and_modules_are_measured_at_their_limits(tmp_path):
    def body(n: int) -> str:  # a function of exactly n lines
        return "\n".join([f"def f{n}():"] + ["    x = 1"] * (n - 2) + ["    return x"]) + "\n"

    pkg = _package(tmp_path, {
        "low/ok.py": body(150),
        "low/long.py": "class C:\n" + textwrap.indent(body(151), "    "),
        "low/big.py": "x = 1\n" * 601,
        "low/fits.py": "x = 1\n" * 600,
    })
    rep = _check(pkg)
    assert rep.long_functions == ["toy/low/long.py:2 C.f151 (151 lines)"]
    assert rep.long_modules == ["toy/low/big.py (601 lines)"]
    assert rep.longest_function is not None and rep.longest_function.lines == 151
    assert rep.largest_module == ("toy/low/big.py", 601)
    failures = rep.failures()
    assert failures["functions over 150 lines"] == rep.long_functions
    assert failures["modules over 600 lines"] == rep.long_modules


def test_upward_imports_and_unlisted_modules_break_the_layer_order(tmp_path):
    pkg = _package(tmp_path, {
        "errors.py": "",
        "low/a.py": "from toy.high import b\n",             # upward, absolute
        "low/c.py": "from ..high.b import thing\n",         # upward, relative
        "low/d.py": "def f():\n    import toy.high.b\n",   # upward, hidden in a function
        "low/e.py": "from typing import TYPE_CHECKING\n"
                    "if TYPE_CHECKING:\n    from toy.high.b import T\n",  # annotations only
        "high/b.py": "from toy.low import a\nfrom toy import errors\nthing = T = 1\n",
        "extra.py": "",                                      # in no layer
    })
    rep = _check(pkg)
    assert rep.layer_violations == [
        "toy/extra.py: toy.extra is in no layer (add 'extra' to LAYERS)",
        "toy/low/a.py:1 toy.low.a -> toy.high.b: layer 1 low imports layer 2 high",
        "toy/low/c.py:1 toy.low.c -> toy.high.b: layer 1 low imports layer 2 high",
        "toy/low/d.py:2 toy.low.d -> toy.high.b (in a function): layer 1 low imports layer 2 high",
    ]
    assert "imports against the layer order" in rep.failures()


def test_in_function_imports_of_the_package_are_counted_against_the_budget(tmp_path):
    pkg = _package(tmp_path, {
        "low/a.py": "",
        "low/b.py": """\
            import importlib

            MODULES = {"x": "toy.low.a"}

            def f():
                import json                         # third-party / stdlib: not counted
                import toy.low.a
                from toy.low import a
                from . import a as again
                importlib.import_module("yaml")     # not counted
                importlib.import_module("toy.low.a")
                importlib.import_module(".a", "toy.low")
                return importlib.import_module(MODULES["x"])  # computed, module names toy.low.a

            g = lambda: importlib.import_module("toy.low.a")
        """,
        "low/c.py": """\
            import importlib

            def load(name):
                return importlib.import_module(name)  # computed; no toy module named here
        """,
    })
    rep = _check(pkg)
    assert rep.infunction_imports == [
        "toy/low/b.py:7 toy.low.b -> toy.low.a",
        "toy/low/b.py:8 toy.low.b -> toy.low.a",
        "toy/low/b.py:9 toy.low.b -> toy.low.a",
        "toy/low/b.py:11 toy.low.b -> toy.low.a (import_module)",
        "toy/low/b.py:12 toy.low.b -> toy.low.a (import_module)",
        "toy/low/b.py:13 toy.low.b -> <computed> (import_module)",
        "toy/low/b.py:15 toy.low.b -> toy.low.a (import_module)",
    ]
    assert "in-function imports of the package over 5" in rep.failures()
    assert "in-function imports of the package over 7" not in _check(
        pkg, limits=cl.Limits(infunction_imports=7)).failures()


def test_torch_free_modules_are_followed_through_imports_and_parent_packages(tmp_path):
    pkg = _package(tmp_path, {
        "low/cfg.py": "from toy.low import helper\n",
        "low/helper.py": "import torch.nn\n",
        "low/ok.py": "import json\nfrom typing import TYPE_CHECKING\n"
                     "if TYPE_CHECKING:\n    import torch\n"
                     "def f():\n    import transformers\n",
        "high/__init__.py": "from transformers import AutoModel\n",
        "high/cfg.py": "",
    })
    rep = _check(pkg, torch_free=("low.cfg", "low.ok", "high.cfg", "gone"))
    assert rep.torch_free_violations == [
        "toy.low.cfg imports torch: toy.low.cfg -> toy.low.helper -> torch",
        "toy.high.cfg imports transformers: toy.high.cfg -> toy.high -> transformers",
        "toy.gone: listed in TORCH_FREE but not found",
    ]


def test_a_file_that_does_not_parse_is_a_failure(tmp_path):
    pkg = _package(tmp_path, {"low/a.py": "def f(:\n"})
    rep = _check(pkg)
    assert rep.syntax_errors and rep.syntax_errors[0].startswith("toy/low/a.py:1")
    assert "files that do not parse" in rep.failures()


def test_main_prints_the_measurements_and_exits_1_on_a_violation(tmp_path, capsys):
    layers = cl.LAYERS
    low, high = layers[1][1][0], layers[2][1][0]  # two real layer names, lowest first
    torch_free = {name.replace(".", "/") + ".py": "" for name in cl.TORCH_FREE}
    pkg = _package(tmp_path, {
        f"{low}/a.py": f"from toy.{high} import b\n",
        f"{high}/b.py": "def f():\n    return 1\n",
        **torch_free,
    })
    assert cl.main([str(pkg)]) == 1
    out = capsys.readouterr().out
    assert "largest module: " in out and "longest function: " in out
    assert f"toy.{low}.a -> toy.{high}.b" in out
    assert "layout: FAILED" in out
    (pkg / low / "a.py").write_text("")
    assert cl.main([str(pkg)]) == 0
    assert capsys.readouterr().out.rstrip().endswith("layout: OK")
