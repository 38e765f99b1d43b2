import pytest
from torch import nn

from tinymnist.models.summary import summarize


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
    assert s.layers[-1].dense and s.layers[-1].rf is None  # the dense layer sees everything: no number to follow
    assert "whole 28x28 input" in s.rf_text and s.layers[-2].rf == 3


def test_frozen_params_are_not_trainable():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Conv2d(2, 2, 3))
    model[0].weight.requires_grad_(False)
    s = summarize(model)
    assert s.total_params - s.trainable_params == 18


@pytest.mark.parametrize("name", ["Model_1", "Model_6"])
def test_series_models_cover_the_digit(name):
    from tinymnist.models.model import create_model

    assert summarize(create_model(name)).rf >= 28


class _DeclaredOutOfOrder(nn.Module):
    """Layers declared in one order and run in another, ReLU and pooling as functions, as students write them."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 10)
        self.conv2 = nn.Conv2d(8, 16, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv1 = nn.Conv2d(1, 8, 3, bias=False)
        self.gap = nn.AvgPool2d(11)

    def forward(self, x):
        import torch.nn.functional as F

        x = self.bn1(F.relu(self.conv1(x)))         # (8, 26, 26) RF 3
        x = F.max_pool2d(x, 2)                      # (8, 13, 13): invisible to module hooks
        x = F.relu(self.conv2(x))                   # (16, 11, 11)
        x = self.gap(x).flatten(1)
        return F.log_softmax(self.fc(x), dim=1)


def test_any_network_in_the_order_its_modules_run():
    from tinymnist.models.summary import format_summary

    s = summarize(_DeclaredOutOfOrder())
    assert [x.kind for x in s.layers] == ["Conv2d", "BatchNorm2d", "Conv2d", "AvgPool2d", "Linear"]
    assert [x.shape for x in s.layers][:3] == [(8, 26, 26), (8, 26, 26), (16, 11, 11)]
    assert [x.rf for x in s.layers[:2]] == [3, 3]
    # the functional pool changed the map outside any module: from there the receptive field is not guessed
    assert s.layers[2].rf is None and s.lost_at == "Conv2d (conv2)"
    assert s.layers[-1].dense and s.macs == 8 * 26 * 26 * 9 + 16 * 11 * 11 * 72 + 160
    text = format_summary(s)
    assert "?" in text and "all" in text and "whole 28x28 input" in text


def test_padding_avgpool_and_dropout_follow_the_receptive_field():
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Dropout2d(0.1), nn.BatchNorm2d(4),
                          nn.AvgPool2d(2), nn.Conv2d(4, 10, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    s = summarize(model)
    assert [x.rf for x in s.layers] == [3, 3, 3, 3, 4, 8, 8 + 11 * 2, 30]
    assert s.rf_text == "30x30"
