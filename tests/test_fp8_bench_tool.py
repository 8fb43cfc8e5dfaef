"""bench/fp8.py's --inductor settings (the compiler options a GPU run tries)."""

import importlib.util
from pathlib import Path

import pytest

SPEC = importlib.util.spec_from_file_location("fp8_bench", Path(__file__).parents[1] / "bench/fp8.py")
assert SPEC is not None and SPEC.loader is not None
fp8_bench = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(fp8_bench)


def test_inductor_settings_read_booleans_numbers_and_text():
    settings = fp8_bench.inductor_settings(
        "max_autotune_gemm=true, coordinate_descent_tuning=False,max_autotune_gemm_backends=ATEN+TRITON,"
        "autotune_fallback_to_aten=true"
    )
    assert settings == {
        "max_autotune_gemm": True,
        "coordinate_descent_tuning": False,
        "max_autotune_gemm_backends": "ATEN,TRITON",
        "autotune_fallback_to_aten": True,
    }
    assert fp8_bench.inductor_settings("triton.multi_kernel=1") == {"triton.multi_kernel": 1}
    assert fp8_bench.inductor_settings("") == {}
    assert fp8_bench.inductor_settings("max_autotune_gemm_search_space=EXHAUSTIVE") == {
        "max_autotune_gemm_search_space": "EXHAUSTIVE"
    }


@pytest.mark.parametrize(
    ("text", "message"),
    [("no_such_setting=1", "no setting 'no_such_setting'"), ("max_autotune_gemm", "not key=value")],
)
def test_inductor_settings_name_what_is_wrong(text, message):
    with pytest.raises(SystemExit, match=message):
        fp8_bench.inductor_settings(text)


def test_inductor_settings_take_effect_through_the_config_patch():
    import torch._inductor.config as inductor

    settings = fp8_bench.inductor_settings("triton.multi_kernel=1,coordinate_descent_tuning=true")
    with inductor.patch(settings):
        assert inductor.triton.multi_kernel == 1 and inductor.coordinate_descent_tuning is True
    assert inductor.triton.multi_kernel == 0
