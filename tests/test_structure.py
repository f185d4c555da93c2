"""The package's structure, checked: no import cycle, public names across modules, small files,
one description of the kernel's arguments, a rendered-module cache keyed by render fields.

docs/architecture.md draws the layers these tests keep apart."""

from __future__ import annotations

import ast
import importlib
import re
import types
from pathlib import Path

import pytest
import torch

from qflash_gen import codegen, launch, quant
from qflash_gen.codegen import asm, signature
from qflash_gen.config import DEFAULT_CONFIG, LAUNCH_FIELDS, RENDER_FIELDS, KernelConfig

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "qflash_gen"
MAX_LINES = 500


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(path: Path, name: str) -> list[tuple[str, list[str], int]]:
    """Every import in a file, top-level or inside functions: ``(module, imported names, line)``
    with relative imports resolved."""
    out = []
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out.extend((alias.name, [], node.lineno) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            out.append((base, [alias.name for alias in node.names], node.lineno))
    return out


def _edges(name: str, path: Path) -> set[str]:
    """The qflash_gen modules ``name`` imports (``from pkg import mod`` counts as ``pkg.mod``).
    A package's ``__init__`` that runs because one of its submodules is imported is Python's
    mechanics, not a dependency of the importer, so it is not an edge."""
    found = set()
    for module, names, _ in _imports(path, name):
        if not module.startswith("qflash_gen"):
            continue
        subs = [f"{module}.{n}" for n in names if f"{module}.{n}" in MODULES]
        found.update(subs or [module])
        if subs and len(subs) < len(names):
            found.add(module)
    found.discard(name)
    return {m for m in found if m in MODULES}


def test_no_import_cycle_among_the_package_modules():
    graph = {name: _edges(name, path) for name, path in MODULES.items()}
    assert "qflash_gen.kernel" in graph["qflash_gen.api"]  # the walk sees imports (sanity)
    assert "qflash_gen.tune.sweep" in graph["qflash_gen.tune.commands"]  # ... function-level ones too
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt) :] + [nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


def _private_uses(path: Path, name: str) -> list[str]:
    """Private (``_``-prefixed) names of qflash_gen modules that ``path`` reaches into: imported
    with ``from m import _x``, or read as ``m._x`` of a qflash_gen module bound by an import."""
    bad = []
    aliases: dict[str, str] = {}
    for module, names, line in _imports(path, name):
        if not module.startswith("qflash_gen"):
            continue
        parts = module.split(".")
        if any(p.startswith("_") for p in parts):
            bad.append(f"{path.name}:{line} imports {module}")
        if module == name:
            continue
        for n in names:
            if n.startswith("_") and not n.startswith("__"):
                bad.append(f"{path.name}:{line} imports {module}.{n}")
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("qflash_gen"):
            for alias in node.names:
                if f"{node.module}.{alias.name}" in MODULES:
                    aliases[alias.asname or alias.name] = f"{node.module}.{alias.name}"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("qflash_gen") and alias.asname:
                    aliases[alias.asname] = alias.name
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id in aliases
            and node.attr.startswith("_")
            and not node.attr.startswith("__")
        ):
            bad.append(f"{path.name}:{node.lineno} reads {aliases[node.value.id]}.{node.attr}")
    return bad


def test_no_module_imports_another_modules_private_names():
    bad = [use for name, path in MODULES.items() for use in _private_uses(path, name)]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("folder", ["tests", "tools"])
def test_tests_and_tools_use_public_names_only(folder):
    bad = []
    for path in sorted((ROOT / folder).glob("*.py")):
        bad += _private_uses(path, f"{folder}.{path.stem}")
        text = path.read_text(encoding="utf-8")
        bad += [f"{path.name}: patches {m}" for m in re.findall(r"setattr\(\w+, \"_[a-z]\w*\"", text)]
    assert not bad, "\n".join(bad)


def test_no_file_in_the_package_is_over_500_lines():
    long = {str(p.relative_to(ROOT)): n for p in MODULES.values() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, long


# -- the kernel's argument list: one description ------------------------------------------------------
def _kernel_params(source: str) -> list[str]:
    fn = next(
        n for n in ast.parse(source).body if isinstance(n, ast.FunctionDef) and n.name == codegen.KERNEL_NAME
    )
    return [a.arg for a in fn.args.args]


@pytest.mark.parametrize("cfg", [DEFAULT_CONFIG, KernelConfig(block_n=256, exp_variant="lut", lut_bits=5)])
def test_the_rendered_kernel_takes_exactly_the_signature_modules_parameters(cfg):
    src = codegen.render(cfg)
    assert _kernel_params(src) == list(signature.names())
    constexpr = set(signature.constexpr_names())
    assert "BLOCK_N" not in signature.names() and "BLOCK_M" not in signature.names()  # rendered, not passed
    assert f"BLOCK_N: tl.constexpr = {cfg.block_n}" in src and f"BLOCK_M: tl.constexpr = {cfg.block_m}" in src
    assert {"N_CTX", "TAIL_M", "HPP"} <= constexpr
    assert "REM" not in src.split(f"def {codegen.KERNEL_NAME}(")[1]  # TAIL_M comes from Python


class _Recorder:
    """Stands in for a rendered module's ``_qflash_fwd``: records launches and warm-ups."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple, dict]] = []

    def __getitem__(self, grid):
        return self

    def __call__(self, *args, **kwargs):
        self.calls.append(("launch", args, kwargs))

    def warmup(self, *args, **kwargs):
        self.calls.append(("warmup", args, kwargs))
        return types.SimpleNamespace(_init_handles=lambda: None)


def _same(mine, real) -> bool:
    if isinstance(real, torch.Tensor):
        return getattr(mine, "dtype", None) == real.dtype
    return mine == real


def test_every_launcher_and_asm_build_their_arguments_from_the_signature():
    cfg = KernelConfig(block_m=32, block_n=128, num_warps=8, num_stages=3, max_regs=168, heads_per_program=2)
    shape = b, h, n, d = (2, 12, 197, 64)
    q8 = torch.zeros(shape, dtype=torch.int8)
    out = torch.empty(shape, dtype=torch.float16)
    params = quant.make_params(0.05, 0.05, 0.05, head_dim=d)
    rec = _Recorder()
    module = types.SimpleNamespace(_qflash_fwd=rec)
    launch.launch_module(module, cfg, q8, q8, q8, params, None, out, torch.float16)
    launch.compiled_for(module, cfg, launch.pack_args(cfg, q8, q8, q8, params, None, out, torch.float16))
    args, options = asm.kernel_arguments(cfg, shape, masked=False, out_dtype="fp16")
    assert len(args) == len(signature.PARAMS) and options == signature.launch_options(cfg)
    for kind, real, kwargs in rec.calls:
        assert len(real) == len(signature.PARAMS), kind  # every argument positional, in PARAMS order
        assert all(_same(m, r) for m, r in zip(args, real, strict=True)), kind
        assert {k: v for k, v in kwargs.items() if k != "grid"} == options, kind
    named = dict(zip(signature.names(), rec.calls[0][1], strict=True))
    assert named["TAIL_M"] == cfg.tail_rows(n) == 16 and named["HPP"] == cfg.heads_for(b * h) == 2
    assert named["H"] == h and named["stride_qh"] == n * d and named["OUT_FLOAT"] is True


def test_launch_sources_and_tools_pack_through_the_signature():
    """No launcher writes the argument list out by hand: each file that calls the kernel entry
    packs its arguments with ``signature.pack``."""
    files = [PACKAGE / "launch.py", PACKAGE / "codegen" / "asm.py", ROOT / "tools" / "overhead.py"]
    for path in files:
        text = path.read_text(encoding="utf-8")
        assert "signature.pack(" in text, path
        assert "N_CTX=" not in text and "BLOCK_N=" not in text, path  # no constexpr spelled out


def test_adding_a_parameter_is_one_entry():
    """A parameter added to PARAMS appears in the rendered parameter list and in every packed
    launch (here: a hypothetical stride; the per-group scale strides came in this way)."""
    extra = signature.Param("stride_xz", signature.INT, "h * 0", "a hypothetical new argument")
    params = (*signature.PARAMS[:-7], extra, *signature.PARAMS[-7:])
    lines = signature.render_params(params).splitlines()
    assert "    stride_xz," in lines and "    # a hypothetical new argument" in lines
    source, pack = signature.build_pack(params)
    params_arg = types.SimpleNamespace(scales="table", c_bits=7)
    packed = pack(
        *(["ptr"] * 5), params_arg, (0, 4), 1, "ptr", *([(1, 2, 3, 4)] * 5), 12, 197, 64, False, True, 197, 16, 1
    )
    assert len(packed) == len(params) and packed[len(params) - 8] == 0 and "h * 0" in source


# -- render fields and launch fields ----------------------------------------------------------------
def test_config_fields_split_into_render_and_launch_fields():
    assert set(RENDER_FIELDS) | set(LAUNCH_FIELDS) == set(KernelConfig.__dataclass_fields__)
    assert set(LAUNCH_FIELDS) == {"max_regs", "heads_per_program"}
    cfg = DEFAULT_CONFIG.replace(max_regs=128, heads_per_program=4)
    assert cfg.render_part() == DEFAULT_CONFIG and cfg.render_key == DEFAULT_CONFIG.hash
    assert cfg.to_dict()["max_regs"] == 128 and cfg.hash != DEFAULT_CONFIG.hash  # the DB still tells them apart


@pytest.mark.parametrize("field, value", [("max_regs", 168), ("heads_per_program", 2)])
def test_configs_differing_only_in_a_launch_field_share_one_rendered_module(field, value):
    base = KernelConfig(block_m=32, block_n=64, exp_variant="idiv", rescale="idiv", rescale_bits=0)
    other = base.replace(**{field: value})
    assert codegen.render(other) == codegen.render(base)
    assert codegen.load(other) is codegen.load(base)
    assert codegen.load(base.replace(num_warps=8)) is not codegen.load(base)  # a render field


def test_old_module_paths_still_export_their_names():
    runtime = importlib.import_module("qflash_gen.runtime")
    models = importlib.import_module("qflash_gen.models")
    ops = importlib.import_module("qflash_gen.ops")
    assert callable(runtime.attention) and callable(runtime.launch) and callable(runtime.default_config)
    assert callable(models.patch_model) and callable(models.calibrate) and models.QFlashAttention
    assert callable(ops.static_table) and callable(ops.config_arg)
