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
