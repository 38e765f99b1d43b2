import pytest
from torch import nn

from tinymnist.summary import summarize


def test_receptive_field_of_a_known_stack():
    # Worked by hand: rf_out = rf_in + (k - 1) * dilation * jump_in, jump_out = jump_in * stride.
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3),                     # rf 3, jump 1, 26x26
        nn.Conv2d(4, 4, 3),                     # rf 5, jump 1, 24x24
        nn.MaxPool2d(2),                        # rf 6, jump 2, 12x12
        nn.Conv2d(4, 4, 3),                     # rf 10, jump 2, 10x10
        nn.Conv2d(4, 4, 3, dilation=2),         # rf 18, jump 2, 6x6
        nn.Conv2d(4, 4, 3, stride=2),           # rf 22, jump 4, 2x2
        nn.AdaptiveAvgPool2d(1),                # rf 22 + (2 - 1) * 4 = 26
    )
    s = summarize(model)
    assert [x.rf for x in s.layers] == [3, 5, 6, 10, 18, 22, 26]
    assert [x.jump for x in s.layers] == [1, 1, 2, 2, 2, 4, 4]
    assert [x.shape[-1] for x in s.layers] == [26, 24, 12, 10, 6, 2, 1]


def test_params_and_macs():
    model = nn.Sequential(nn.Conv2d(1, 8, 3, bias=False), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                          nn.Linear(8 * 26 * 26, 10))
    s = summarize(model)
    assert [x.params for x in s.layers] == [72, 16, 0, 0, 8 * 26 * 26 * 10 + 10]
    assert s.layers[0].macs == 8 * 26 * 26 * 9
    assert s.layers[-1].macs == 8 * 26 * 26 * 10
    assert s.total_params == s.trainable_params == sum(x.params for x in s.layers)
    assert s.rf == 3 + 25  # the dense layer sees the whole 26x26 map


def test_frozen_params_are_not_trainable():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Conv2d(2, 2, 3))
    model[0].weight.requires_grad_(False)
    s = summarize(model)
    assert s.total_params - s.trainable_params == 18


@pytest.mark.parametrize("name", ["Model_1", "Model_6"])
def test_series_models_cover_the_digit(name):
    from tinymnist.model import create_model

    assert summarize(create_model(name)).rf >= 28
