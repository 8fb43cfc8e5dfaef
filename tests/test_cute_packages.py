"""The optional CuTe-DSL kernel packages (FlashAttention-4, QuACK): imported only when chosen, and with a
clear error naming what to install, or what release to pin, and where they run."""

from __future__ import annotations

import re
import sys

import pytest
import torch

import threefold.model.fa4 as fa4
import threefold.model.quack_mlp as quack_mlp

FA4_PIN, QUACK_PIN = r"flash-attn-4==4\.0\.0b40", r"quack-kernels==0\.6\.5"
PACKAGES = {  # the module, a kernel it needs, the install command its error gives, the release to pin
    "fa4": (fa4, "_flash_attn_fwd", rf"pip install --pre {FA4_PIN}", FA4_PIN),
    "quack": (quack_mlp, "mlp_func", rf"pip install {QUACK_PIN}", QUACK_PIN),
}


@pytest.fixture(params=list(PACKAGES))
def package(request, monkeypatch):
    module, *rest = PACKAGES[request.param]
    module.kernels.cache_clear()
    yield module, *rest
    module.kernels.cache_clear()


def test_a_missing_package_says_what_to_install(package, monkeypatch):
    module, _, install, _ = package
    monkeypatch.setattr(module, "KERNELS_MODULE", "threefold_no_such_module.kernels")
    option = re.escape(module.OPTION)
    with pytest.raises(RuntimeError, match=rf"{option} needs .*{install} \(importing threefold_no_such"):
        module.kernels()


def test_a_package_without_the_kernels_names_the_release_to_pin(package, monkeypatch):
    module, name, _, pin = package
    monkeypatch.setattr(module, "KERNELS_MODULE", "json")  # importable, but none of the kernels in it
    with pytest.raises(RuntimeError, match=rf"json has no {name}: this .* release is not one .*; pin {pin}"):
        module.kernels()


@pytest.mark.parametrize("check", [fa4.check_fa4_device, quack_mlp.check_quack_device], ids=["fa4", "quack"])
def test_the_kernels_need_a_cuda_device(check):
    with pytest.raises(ValueError, match=r"runs on CUDA GPUs, not on 'cpu'"):
        check(torch.device("cpu"))


def fake_quack(root, epilogue_source: str) -> None:
    """A package `fakequack` under `root` with QuACK's MLP entry point and an epilogue library module."""
    package = root / "fakequack"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "mlp.py").write_text("def mlp_func(*args, **kwargs):\n    raise NotImplementedError\n")
    (package / "epilogues.py").write_text(epilogue_source)


@pytest.fixture
def fake_quack_paths(monkeypatch, tmp_path):
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(quack_mlp, "KERNELS_MODULE", "fakequack.mlp")
    monkeypatch.setattr(quack_mlp, "EPILOGUE_MODULE", "fakequack.epilogues")
    quack_mlp.kernels.cache_clear()
    yield tmp_path
    quack_mlp.kernels.cache_clear()
    for name in ("fakequack", "fakequack.mlp", "fakequack.epilogues"):
        sys.modules.pop(name, None)


def test_quack_epilogues_built_with_the_model(fake_quack_paths):
    fake_quack(fake_quack_paths, "import sys\nsys.modules[__name__].BUILT = True\n")
    assert quack_mlp.kernels().__name__ == "fakequack.mlp"
    assert sys.modules["fakequack.epilogues"].BUILT


def test_quack_epilogues_that_cannot_be_keyed_say_where_the_cute_dsl_must_lie(fake_quack_paths):
    message = "epilogue fn depends on <ContextVar '_LOC_TRANSFORMS'>, which has no fail-closed semantic key"
    fake_quack(fake_quack_paths, f"raise TypeError({message!r})\n")
    expected = r"mlp_backend = 'quack'.*_LOC_TRANSFORMS.*folder named site-packages"
    with pytest.raises(RuntimeError, match=expected):
        quack_mlp.kernels()


def test_other_quack_epilogue_errors_pass_through(fake_quack_paths):
    fake_quack(fake_quack_paths, "raise TypeError('something else')\n")
    with pytest.raises(TypeError, match="something else"):
        quack_mlp.kernels()
