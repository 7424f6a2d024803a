"""Import rules, checked on the source (AST) so the test is fast, plus one real import.

* importing the config schemas (``sfmed.config.*``) does not import torch;
* ``sfmed.convert`` and the training packages (``sfmed.train``, ``sfmed.recipes``) do not import
  each other (both use ``sfmed.core``);
* ``sfmed.core`` imports no stage package (models, convert, train, recipes, data, eval);
* library code imports Hydra only inside config registration functions (``register``);
  entry points (``launch/``) may import it anywhere;
* no module outside ``sfmed.models`` names a model family's Hugging Face classes.

Every rule is a function of a list of (module name, source) pairs; the tests run them on the
package and on synthetic bad modules, which must fail.
"""

from __future__ import annotations

import ast
import functools
import re
import subprocess
import sys
from dataclasses import dataclass

import pytest

from conftest import REPO

STAGES = ("models", "convert", "train", "recipes", "data", "eval")
# transformers' class names of the families sfmed supports (config, model and its heads).
FAMILY_CLASS = re.compile(
    r"\b(Qwen2|Qwen2Moe|Qwen3|Llama|Baichuan|Mistral)"
    r"(Config|Model|ForCausalLM|PreTrainedModel|Attention|DecoderLayer|Tokenizer\w*)\b"
)


@dataclass
class Module:
    """A module's dotted name and source text."""

    name: str
    source: str
    is_package: bool = False

    @functools.cached_property
    def tree(self) -> ast.Module:
        """The parsed source."""
        return ast.parse(self.source)


@functools.cache
def _package_modules() -> tuple[Module, ...]:
    return tuple(package_modules())


def package_modules() -> list[Module]:
    """Every module of the ``sfmed`` package."""
    out = []
    for path in sorted((REPO / "sfmed").rglob("*.py")):
        parts = path.relative_to(REPO).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out.append(Module(name, path.read_text(encoding="utf-8"), parts[-1] == "__init__"))
    return out


def _imports(mod: Module):
    """(names one import statement may bring in, enclosing function names) per statement."""

    def walk(node, funcs):
        for child in ast.iter_child_nodes(node):
            inner = funcs
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                inner = (*funcs, child.name)
            if isinstance(child, ast.Import):
                for alias in child.names:
                    yield [alias.name], inner
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:  # relative: resolve against this module's package
                    pkg = mod.name.split(".")
                    drop = child.level - 1 if mod.is_package else child.level
                    pkg = pkg[: len(pkg) - drop]
                    base = ".".join([*pkg, base] if base else pkg)
                # `from sfmed import train` brings in sfmed.train: a candidate too
                yield [base, *(f"{base}.{a.name}" for a in child.names)], inner
            yield from walk(child, inner)

    yield from walk(mod.tree, ())


def _in(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def forbidden_imports(modules: list[Module]) -> list[str]:
    """Violations of the package-direction rules, one line each."""
    rules = [
        ("sfmed.convert", ("sfmed.train", "sfmed.recipes")),
        ("sfmed.train", ("sfmed.convert",)),
        ("sfmed.recipes", ("sfmed.convert",)),
        ("sfmed.core", tuple(f"sfmed.{s}" for s in STAGES)),
    ]
    bad = []
    for mod in modules:
        for names, _ in _imports(mod):
            for owner, banned in rules:
                if not _in(mod.name, owner):
                    continue
                hits = [n for n in names if any(_in(n, b) for b in banned)]
                if hits:
                    bad.append(f"{mod.name} imports {hits[0]} ({owner} must not import {banned})")
    return bad


def hydra_outside_registration(modules: list[Module]) -> list[str]:
    """Library modules importing Hydra anywhere but inside a ``register`` function."""
    return [
        f"{mod.name} imports {names[0]} outside a register() function"
        for mod in modules
        for names, funcs in _imports(mod)
        if any(_in(n, "hydra") for n in names) and "register" not in funcs
    ]


def family_classes_outside_models(modules: list[Module]) -> list[str]:
    """Modules outside ``sfmed.models`` that name a family's HF classes (code, not comments)."""
    bad = []
    for mod in modules:
        if _in(mod.name, "sfmed.models"):
            continue
        for node in ast.walk(mod.tree):
            names = []
            if isinstance(node, ast.Name):
                names = [node.id]
            elif isinstance(node, ast.Attribute):
                names = [node.attr]
            elif isinstance(node, ast.alias):
                names = [node.name.split(".")[-1], node.asname or ""]
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                names = [node.value] if FAMILY_CLASS.fullmatch(node.value) else []
            hits = [n for n in names if n and FAMILY_CLASS.fullmatch(n)]
            bad += [f"{mod.name}:{node.lineno} names {h}" for h in hits]
    return bad


def test_package_follows_the_import_rules():
    modules = list(_package_modules())
    assert len(modules) > 50  # the walk found the package
    rules = (forbidden_imports, hydra_outside_registration, family_classes_outside_models)
    assert [v for rule in rules for v in rule(modules)] == []


@pytest.mark.parametrize(
    "name,source,rule,expected",
    [
        ("sfmed.convert.bad", "from sfmed.train.checkpoint import load_weights\n",
         forbidden_imports, "sfmed.convert.bad imports sfmed.train.checkpoint"),
        ("sfmed.convert.bad", "def f():\n    import sfmed.recipes.pretrain\n",
         forbidden_imports, "sfmed.convert.bad imports sfmed.recipes.pretrain"),
        ("sfmed.train.bad", "from sfmed import convert\n",
         forbidden_imports, "sfmed.train.bad imports sfmed.convert"),
        ("sfmed.core.bad", "from ..models import build_model\n",
         forbidden_imports, "sfmed.core.bad imports sfmed.models"),
        ("sfmed.core.bad", "from sfmed.data.blend import resolve_blend\n",
         forbidden_imports, "sfmed.core.bad imports sfmed.data.blend"),
        ("sfmed.train.bad", "import hydra\n",
         hydra_outside_registration, "sfmed.train.bad imports hydra outside"),
        ("sfmed.config.bad", "def helper():\n    from hydra.core.config_store import ConfigStore\n",
         hydra_outside_registration, "sfmed.config.bad imports hydra.core.config_store"),
        ("sfmed.train.bad", "from transformers import Qwen2ForCausalLM\n",
         family_classes_outside_models, "sfmed.train.bad:1 names Qwen2ForCausalLM"),
        ("sfmed.convert.bad", "import transformers\ncfg = transformers.Qwen2Config()\n",
         family_classes_outside_models, "sfmed.convert.bad:2 names Qwen2Config"),
        ("sfmed.eval.bad", "cls = getattr(transformers, 'LlamaForCausalLM')\n",
         family_classes_outside_models, "sfmed.eval.bad:1 names LlamaForCausalLM"),
    ],
)  # fmt: skip
def test_a_bad_module_breaks_its_rule(name, source, rule, expected):
    """Each rule catches a synthetic violation (and only with it added)."""
    clean = list(_package_modules())
    assert rule(clean) == []
    found = rule([*clean, Module(name, source)])
    assert len(found) == 1 and found[0].startswith(expected), found


def test_allowed_shapes_pass():
    ok = [
        Module("sfmed.config.x", "def register():\n    from hydra.core.config_store import CS\n"),
        Module("sfmed.models.families.x", "from transformers import Qwen2Config\n"),
        Module("sfmed.train.x", "# Qwen2ForCausalLM in a comment is fine\nx = 'qwen2'\n"),
        Module("sfmed.recipes.x", "from sfmed.train.data import chunk_iterators\n"),
        Module("sfmed.convert.x", "from sfmed.core.ckpt_load import load_mcore_weights\n"),
    ]
    for rule in (forbidden_imports, hydra_outside_registration, family_classes_outside_models):
        assert rule(ok) == [], rule.__name__


def test_config_schemas_import_without_torch():
    """A real interpreter: importing every schema leaves torch (and Hydra) unloaded."""
    schemas = sorted(
        p.stem for p in (REPO / "sfmed" / "config").glob("*.py") if p.stem != "__init__"
    )
    assert {"run", "pretrain", "model", "train"} <= set(schemas)
    code = (
        f"import {', '.join(f'sfmed.config.{s}' for s in schemas)}; import sys; "
        "bad = [m for m in ('torch', 'hydra', 'megatron') if m in sys.modules]; "
        "assert not bad, bad"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
