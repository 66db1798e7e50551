"""The node start-up check: the NVIDIA driver against the CUDA build of torch (NVIDIA's minor-version
compatibility table), one line when it is too old, silence on CPU nodes and CPU builds."""
from __future__ import annotations

import pytest

from pipeline.node_check import driver_problem


@pytest.mark.parametrize(("cuda", "driver"), [("13.0", "580.65.06"), ("13.2", "590.44.01"), ("12.8", "525.60.13"),
                                              ("12.1", "570.86.15"), ("11.8", "450.80.02")])
def test_a_driver_at_or_above_the_minimum_passes(cuda, driver):
    assert driver_problem(cuda, driver) is None


@pytest.mark.parametrize(("cuda", "driver", "needed"), [("13.0", "570.172.08", ">= 580"),
                                                        ("12.4", "525.60.12", ">= 525.60.13"),
                                                        ("11.8", "440.33.01", ">= 450.80.02"),
                                                        ("14.0", "575.51.03", ">= 580")])
def test_a_driver_below_the_minimum_is_one_line_naming_both_versions(cuda, driver, needed):
    problem = driver_problem(cuda, driver)
    assert problem is not None and "\n" not in problem
    assert driver in problem and f"CUDA {cuda}" in problem and needed in problem


@pytest.mark.parametrize(("cuda", "driver"), [(None, "470.82.01"), ("13.0", None), ("10.2", "440.33.01")])
def test_no_driver_a_cpu_build_or_an_older_cuda_than_the_table_say_nothing(cuda, driver):
    assert driver_problem(cuda, driver) is None
