"""Config validation names the field, the value and the allowed range."""
import pytest

import lte_compile as lte


@pytest.mark.parametrize("field,value,match", [
    ("tau", 0.0, r"tau=0.0 is invalid: expected a float in \(0, 1\)"),
    ("tau", 1.5, r"tau=1.5"),
    ("expert_size", 0, r"expert_size=0 is invalid: expected an integer > 0"),
    ("expert_size", -32, r"expert_size=-32"),
    ("mode", "sparse", r"mode='sparse'"),
    ("on_unsupported", "ignore", r"on_unsupported='ignore'"),
])
def test_bad_config_values_raise_config_error(field, value, match):
    with pytest.raises(lte.ConfigError, match=match) as info:
        lte.Config(**{field: value})
    assert isinstance(info.value, ValueError)  # ConfigError is a ValueError too
    assert info.value.field == field


def test_config_round_trips_through_dict():
    cfg = lte.Config(expert_size=16, tau=0.4, seed=3, extra={"note": "x"})
    assert lte.Config.from_dict(cfg.to_dict()) == cfg


def test_config_from_other_version_is_refused():
    d = lte.Config().to_dict()
    d["version"] = 99
    with pytest.raises(lte.ConfigError, match="version"):
        lte.Config.from_dict(d)


@pytest.mark.parametrize("field,value", [
    ("router_init_std", float("nan")), ("router_init_std", float("inf")), ("router_init_std", -0.1),
    ("router_init_std", "0.02"), ("router_bias_init", float("nan")), ("router_bias_init", float("inf")),
    ("router_bias_init", float("-inf")), ("router_bias_init", "1"), ("router_bias_init", True),
    ("expert_size", True), ("expert_size", 32.0), ("expert_size", "32"),
    ("tau", "0.5"), ("tau", float("nan")), ("tau", True), ("tau", None),
    ("kmeans_iters", 2.5), ("kmeans_iters", True), ("kmeans_iters", -1), ("seed", 1.5), ("seed", False),
    ("kernel_layout", 1), ("mode", None), ("on_unsupported", 0), ("extra", [1]),
])
def test_wrong_types_and_non_finite_values_are_refused_up_front(field, value):
    """Issue 11 defect 8: bool is not an int, a string is not a number, NaN/inf are not thresholds."""
    with pytest.raises(lte.ConfigError) as info:
        lte.Config(**{field: value})
    assert info.value.field == field and field in str(info.value)


def test_int_values_for_float_fields_are_accepted():
    cfg = lte.Config(router_init_std=0, router_bias_init=-1)
    assert cfg.router_bias_init == -1.0 and isinstance(cfg.router_bias_init, float)
