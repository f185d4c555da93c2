"""Rendering: every variant renders and parses, rendering is pure, files carry their header,
writes are atomic into QFLASH_GEN_CACHE, and templates ship inside a non-editable install."""

from __future__ import annotations

import ast
import itertools
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from qflash_gen import KernelConfig, codegen
from qflash_gen.config import EXP_VARIANTS

ALL_VARIANTS = [
    KernelConfig(
        exp_variant=exp,
        lut_bits=5 if exp == "lut" else 0,
        rescale=rs,
        rescale_bits=bits if rs == "shift" else 0,
        acc_bits=acc,
    )
    for exp, (rs, bits), acc in itertools.product(
        EXP_VARIANTS, [("shift", 1), ("shift", 8), ("shift", 15), ("idiv", 0)], (32, 64)
    )
]


@pytest.mark.parametrize("cfg", ALL_VARIANTS, ids=lambda c: c.short().replace(" ", "_"))
def test_every_variant_renders_and_parses(cfg):
    src = codegen.render(cfg)
    tree = ast.parse(src)
    names = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
    assert {"_exp2_q15", "_rescale", "_requant_p", "_qflash_fwd"} <= names
    assert f"int{cfg.acc_bits}" in src
    assert f'"""{cfg.exp_variant}:' in src  # the chosen exp macro, and only one _exp2_q15
    assert sum(isinstance(n, ast.FunctionDef) and n.name == "_exp2_q15" for n in tree.body) == 1


def test_render_is_pure_and_header_describes_the_file():
    cfg = KernelConfig(block_n=128, exp_variant="poly2")
    a, b = codegen.render(cfg), codegen.render(KernelConfig.from_dict(cfg.to_dict()))
    assert a == b
    header = ast.get_docstring(ast.parse(a))
    assert "template: qflash_fwd.py.jinja" in header
    assert f"config sha256: {cfg.hash}" in header
    assert "exp_variant: poly2" in header and "block_n: 128" in header
    assert codegen.template_hash()[:16] in header
    assert codegen.render(cfg.replace(block_n=64)) != a


def test_write_is_atomic_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("QFLASH_GEN_CACHE", str(tmp_path))
    src = codegen.render(KernelConfig())
    path = codegen.write_source(src)
    h = codegen.source_hash(src)
    assert path == tmp_path / h[:2] / f"{h}.py" and path.read_text() == src
    assert not list(path.parent.glob(".tmp-*"))  # no temp files left behind
    assert codegen.write_source(src) == path  # idempotent
    mod = codegen.load(KernelConfig(block_m=16))
    assert mod is codegen.load(KernelConfig(block_m=16))  # in-process cache
    assert mod.SOURCE == codegen.render(KernelConfig(block_m=16)) and Path(mod.PATH).is_file()


def test_render_rejects_non_config():
    with pytest.raises(ValueError, match="KernelConfig"):
        codegen.render({"block_m": 64})


@pytest.mark.slow
def test_templates_ship_in_a_non_editable_install(tmp_path):
    """`pip install .` (not -e) into a fresh target: templates come from the installed wheel."""
    root = Path(__file__).resolve().parents[1]
    target = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "--target",
            str(target),
            str(root),
        ],
        check=True,
        capture_output=True,
    )
    code = textwrap.dedent(
        """
        import qflash_gen, qflash_gen.codegen as c
        assert qflash_gen.__file__.startswith(TARGET), qflash_gen.__file__
        src = c.render(qflash_gen.KernelConfig())
        print(str(c.template_dir()))
        """
    ).replace("TARGET", repr(str(target)))
    env = {**os.environ, "PYTHONPATH": str(target)}
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().startswith(str(target))


def test_templates_load_from_beside_the_imported_package(tmp_path):
    """An edited copy of the repository on PYTHONPATH renders its own templates, not those of the
    editable install's checkout (whose finder still maps ``qflash_gen.templates`` there); a copy
    with no templates beside it is a clear error, not a silent render of another copy's."""
    root = Path(__file__).resolve().parents[1]
    ignore = shutil.ignore_patterns("__pycache__")
    copy = tmp_path / "copy"
    shutil.copytree(root / "qflash_gen", copy / "qflash_gen", ignore=ignore)
    shutil.copytree(root / "templates", copy / "templates", ignore=ignore)
    fwd = copy / "templates" / codegen.TEMPLATE_NAME
    text = fwd.read_text()
    anchor = "import triton.language as tl\n"
    assert text.count(anchor) == 1
    fwd.write_text(text.replace(anchor, anchor + "# EDITED-COPY-MARKER\n"))
    code = textwrap.dedent(
        """
        import qflash_gen, qflash_gen.codegen as c
        print(qflash_gen.__file__)
        print(c.template_dir())
        print("EDITED-COPY-MARKER" in c.render(qflash_gen.KernelConfig()))
        """
    )
    env = {**os.environ, "PYTHONPATH": str(copy)}

    def run():
        return subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)

    out = run()
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [str(copy / "qflash_gen" / "__init__.py"), str(copy / "templates"), "True"]
    shutil.rmtree(copy / "templates")
    out = run()
    assert out.returncode != 0
    assert "TemplateLocationError" in out.stderr and "no qflash_fwd.py.jinja sits beside it" in out.stderr
    assert str(copy / "qflash_gen") in out.stderr


def test_the_shipped_db_is_read_from_beside_the_imported_package(tmp_path):
    """As for the templates: an edited copy on PYTHONPATH reads its own tuning_db/, not the
    editable install's."""
    root = Path(__file__).resolve().parents[1]
    ignore = shutil.ignore_patterns("__pycache__")
    copy = tmp_path / "copy"
    shutil.copytree(root / "qflash_gen", copy / "qflash_gen", ignore=ignore)
    (copy / "tuning_db").mkdir()
    code = "import qflash_gen.db.store as s; print(s.shipped_db_dir())"
    env = {**os.environ, "PYTHONPATH": str(copy)}
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(copy / "tuning_db")
