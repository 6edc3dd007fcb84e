import pytest

from masquant import QuantConfig


def test_round_trip_with_version():
    config = QuantConfig(method="awq", w_bits=4, a_bits=16, w_group_size=128, w_symmetric=False)
    data = config.to_dict()
    assert data["version"] == QuantConfig.VERSION
    assert QuantConfig.from_dict(data) == config


@pytest.mark.parametrize("kwargs, message", [
    ({"method": "gptq"}, "unknown method 'gptq'"),
    ({"method": "masquant", "rank": -1}, "rank must be"),
    ({"method": "masquant", "rank": 1.5}, "rank must be"),
    ({"method": "masquant", "residual": "int"}, "residual must be"),
    ({"method": "mas", "lambdas": {"video": 1.0}}, "lambdas must map"),
    ({"method": "mas", "lambdas": "magic"}, "lambdas must be"),
    ({"method": "mas", "lr": 0}, "lr must be positive"),
    ({"w_bits": 1}, r"w_bits must be an integer in \[2, 8\]"),
    ({"w_bits": 16}, r"w_bits must be an integer"),
    ({"a_bits": 12}, r"a_bits must be an integer in \[2, 8\] or 16"),
    ({"a_bits": True}, r"a_bits"),
    ({"w_group_size": -5}, "w_group_size"),
    ({"alpha": 1.5}, "alpha"),
    ({"method": "mas", "mas_batch": 0}, "mas_batch"),
    ({"runtime": "cuda"}, "runtime must be"),
    ({"method": "masquant", "patch_dtype": "int8"}, "patch_dtype must be"),
    ({"rank": 8}, r"method 'smoothquant' has no setting rank \(rank is a setting of lrc, masquant\)"),
    ({"method": "masquant", "colour": 1}, "no method takes colour"),
    ({"method": "masquant", "settings": object()}, "must be a MasquantSettings"),
])
@pytest.mark.reliability(
    case='invalid QuantConfig value',
    expect='ValueError naming the field and the allowed values')
def test_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        QuantConfig(**kwargs)


@pytest.mark.reliability(
    case='config dict of another version or with unknown fields',
    expect='ValueError')
def test_from_dict_rejects_other_versions_and_fields():
    data = QuantConfig().to_dict()
    with pytest.raises(ValueError, match="version"):
        QuantConfig.from_dict({**data, "version": 99})
    with pytest.raises(ValueError, match="unknown quant config fields: colour"):
        QuantConfig.from_dict({**data, "colour": "red"})


def test_short_form_fills_the_methods_own_settings():
    from masquant.methods.masquant import MasquantSettings

    config = QuantConfig(method="masquant", w_bits=4, rank=16, lambdas="auto")
    assert isinstance(config.settings, MasquantSettings) and config.settings.rank == 16
    assert config.rank == 16 and config.lambdas == "auto"  # read through the config
    assert config == QuantConfig(method="masquant", w_bits=4, settings=MasquantSettings(rank=16, lambdas="auto"))
    assert QuantConfig(**{k: v for k, v in config.to_dict().items() if k != "version"}) == config
    with pytest.raises(AttributeError, match="no setting 'alpha'"):
        _ = config.alpha


def test_a_version_1_dict_keeps_the_settings_of_its_method():
    """Version 1 (masquant 0.1.0) wrote every method's settings in one flat record."""
    flat = {"version": 1, "method": "smoothquant", "w_bits": 8, "a_bits": 8, "w_group_size": 0, "w_symmetric": True,
            "alpha": 0.7, "awq_grid": 20, "smooth_down_proj": False, "seed": 0, "calib_batch": 8,
            "lambdas": {"text": 1.0}, "epochs": 2, "mas_batch": 1, "lr": 0.05, "weight_decay": 0.0,
            "min_scale": 0.01, "rank": 32, "residual": "fp", "whiten": True, "ridge": 1e-6, "cmc_guard": True,
            "patch_dtype": "float16", "runtime": "int"}
    config = QuantConfig.from_dict(flat)
    assert config == QuantConfig(method="smoothquant", alpha=0.7)
    assert set(config.to_dict()) == {"version", "method", "w_bits", "a_bits", "w_group_size", "w_symmetric",
                                     "smooth_down_proj", "seed", "calib_batch", "runtime", "w_rounding", "alpha"}
