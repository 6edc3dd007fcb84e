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
    ({"patch_dtype": "int8"}, "patch_dtype must be"),
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
