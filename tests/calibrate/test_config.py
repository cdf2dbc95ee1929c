"""CalibrationConfig: every bad value is a ValueError that says what to pass; calibration_for ties a calibration
to the training config's pattern and layer selection."""

import pytest

import maxq
from maxq.calibrate import CalibrationConfig, calibration_for


@pytest.mark.parametrize(
    "options, message",
    [
        ({"method": "obs"}, "choose one of"),
        ({"n": 4, "m": 2}, "n must be < m"),
        ({"batches": 0}, "positive int"),
        ({"batches": True}, "positive int"),
        ({"blocksize": 0}, "positive int"),
        ({"blocksize": 6, "m": 4}, "multiple of m=4"),
        ({"damp": 0.0}, "> 0"),
        ({"damp": float("nan")}, "finite"),
        ({"strict": "yes"}, "True or False"),
    ],
)
def test_bad_values_say_what_to_do(options, message):
    with pytest.raises(ValueError, match=message):
        CalibrationConfig(**options)


def test_defaults_and_round_trip():
    config = CalibrationConfig()
    assert (config.method, config.n, config.m, config.blocksize, config.damp) == ("sparsegpt", 2, 4, 128, 0.01)
    assert CalibrationConfig(**config.to_dict()) == config
    assert not CalibrationConfig(method="magnitude").needs_data and config.needs_data


def test_calibration_for_takes_the_training_pattern_and_selection():
    training = maxq.SRSTEConfig(n=1, m=8, skip_first=False, strict=True)
    config = calibration_for(training, "wanda")
    assert (config.method, config.n, config.m, config.skip_first, config.strict) == ("wanda", 1, 8, False, True)
    assert calibration_for(training, config) is config
    with pytest.raises(ValueError, match="same pattern"):
        calibration_for(training, CalibrationConfig(n=2, m=4))
    with pytest.raises(ValueError, match="method name"):
        calibration_for(training, 3)
