"""The layout grammar: every token, every error, and the Model_i classes written in it."""

import pytest
import torch

from tinymnist.core.config import TrainConfig
from tinymnist.errors import TinyMnistError
from tinymnist.models.model import Net, create_model, list_models, model_class, parse_layout
from tinymnist.models.summary import summarize


def _counted(layers, bn: bool) -> int:
    """Parameters of a parsed layout, counted by hand from its tokens: a KxK conv has K*K*(cin/groups)*cout weights,
    then BN's scale and shift (or, without BN, a bias); the classifier has K*K*cin*10 (and a bias without BN)."""
    total, c = 0, 1
    for layer in layers:
        if layer.kind == "conv":
            out, groups = layer.out or c, layer.groups or c
            total += layer.k * layer.k * (c // groups) * out + (2 * out if bn else out)
            total += (layer.repeat - 1) * (2 * out if bn else 0)  # a tied repeat: its own BN, the same weight
            c = out
        elif layer.kind == "out":
            total += layer.k * layer.k * c * 10 + (0 if bn else 10)
    return total


@pytest.mark.parametrize("name", list_models())
def test_every_model_has_the_parameters_of_its_layout_and_sees_the_whole_digit(name):
    cls = model_class(name)
    model = create_model(name)
    assert model.num_params() == _counted(parse_layout(cls.layout), cls.bn)
    assert summarize(model).rf >= 28  # every output of the series' networks reads the whole 28x28 image


@pytest.mark.parametrize("text, params", [
    # hand counts: 3x3 conv = 9*cin*cout, BN = 2*cout, no conv bias before BN, 1x1 classifier 10*cin
    ("c8 c16 P c10/1 c16 c16 c16 G o", 7756),  # Model_7
    ("c8 c12 P c8/1 c12 c12 c12 G o", 72 + 16 + 864 + 24 + 96 + 16 + 3 * 0 + 864 + 24 + 2 * (1296 + 24) + 120),
    ("c4 G o", 36 + 8 + 40),
    ("c4 dw G o", 36 + 8 + 36 + 8 + 40),  # depthwise: one 3x3 filter per channel
    ("c4 c8/3g2 G o", 36 + 8 + 9 * 2 * 8 + 16 + 80),  # two groups: each output sees half the inputs
    ("c4 c4r3 G o", 36 + 8 + 144 + 3 * 8 + 40),  # three convs tied to one 3x3x4x4 weight, three BNs
    ("c4 dwr2 G o", 36 + 8 + 36 + 2 * 8 + 40),
])
def test_parameter_counts(text, params):
    assert Net(layout=text).num_params() == params


def test_suffixes_change_geometry_and_receptive_field():
    plain = summarize(Net(layout="c4 c4 G o"))  # layers: conv, BN, ReLU per block
    assert plain.layers[5].shape == (4, 24, 24) and plain.rf == 28  # GAP reads the whole 24x24 map
    same = summarize(Net(layout="c4p c4p G o"))
    assert same.layers[5].shape == (4, 28, 28)
    dilated = summarize(Net(layout="c4d2 G o"))
    assert dilated.layers[0].shape == (4, 24, 24) and dilated.layers[0].rf == 5
    strided = summarize(Net(layout="c4s2 G o"))
    assert strided.layers[0].shape == (4, 13, 13) and strided.layers[0].jump == 2
    assert parse_layout("c10/1p G o")[0].pad == 0 and parse_layout("c8/5pd2 G o")[0].pad == 4


def test_layout_output_is_logits():
    assert Net(layout="c8 c16 P c10/1 c16 c16 c16 G o")(torch.zeros(3, 1, 28, 28)).shape == (3, 10)


@pytest.mark.parametrize("text, fragment", [
    ("c8 X G o", "unknown token 'X'"),
    ("c8 c16 G", "must end with the classifier"),
    ("c8 o G o", "must be the last token"),
    ("", "empty layout"),
    ("c0 G o", "zero size"),
    ("c8 c10/3g4 G o", "groups do not divide"),
    ("c8 c8x G o", "unknown token 'c8x'"),
    ("c8 c16r2 G o", "must keep its channels, not take 8 to 16"),
    ("c8 c8r0 G o", "zero size"),
])
def test_bad_layouts_are_one_clear_error(text, fragment):
    with pytest.raises(TinyMnistError, match=fragment.replace("(", r"\(")):
        Net(layout=text)


def test_shapes_that_do_not_fit_28x28_are_caught_before_training():
    from tinymnist.core.plan import checked_model

    # a recipe is plain data: validating it builds nothing; the network is built and checked once, by the plan
    TrainConfig(model="Model_7", layout="c8 P P P P c8 G o").validate()
    with pytest.raises(TinyMnistError, match="does not fit a 28x28 input"):
        checked_model(TrainConfig(model="Model_7", layout="c8 P P P P c8 G o"))
    with pytest.raises(TinyMnistError, match="not \\(10,\\)"):
        checked_model(TrainConfig(model="Model_7", layout="c8 c8 o"))  # no GAP: a 24x24 map of logits


def test_config_layout_builds_and_round_trips():
    cfg = TrainConfig(model="Model_7", layout="c8 c12 P c8/1 c12 c12 c12 G o").validate()
    assert cfg.build_model().num_params() == 4736
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg


def test_a_tied_repeat_is_one_weight_deeper():
    """c4r3: three conv layers (the map shrinks and the receptive field grows three times) that train one weight:
    a step moves all three, the optimizer, the summary and the weight average see it once, and a checkpoint
    loads back tied."""
    from tinymnist.core.engine import EMA

    model = Net(layout="c4 c4r3 G o")
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs[1].weight is convs[2].weight is convs[3].weight and convs[0].weight is not convs[1].weight
    s = summarize(model)
    assert [layer.shape for layer in s.layers if layer.kind == "Conv2d"][:4] == [(4, 26, 26), (4, 24, 24),
                                                                                (4, 22, 22), (4, 20, 20)]
    assert s.rf == 28 and s.layers[3].rf == 5 and s.layers[9].rf == 9  # the conv rows of blocks 2 and 4
    assert sum(layer.params for layer in s.layers) == s.total_params == model.num_params()

    ema = EMA(model, 0.5)
    before = ema.model.net[1][0].weight.clone()
    torch.nn.init.constant_(convs[1].weight, 1.0)  # the live model moves; the average should move once
    ema.updates = 100  # past the warm-up: the decay is 0.5
    ema.update(model)
    assert torch.allclose(ema.model.net[1][0].weight, 0.5 * before + 0.5)
    assert ema.model.net[1][0].weight is ema.model.net[3][0].weight

    loaded = Net(layout="c4 c4r3 G o")
    loaded.load_state_dict(model.state_dict())
    assert loaded.net[1][0].weight is loaded.net[2][0].weight
    assert torch.equal(loaded.net[2][0].weight, convs[1].weight)


def test_an_activation_replaces_every_relu_and_keeps_the_parameters():
    """TrainConfig.activation swaps the nonlinearity of every conv block of our models (the weights stay the same
    shapes, so the same seed draws the same initial weights); a bad name, or one for a user's own class, is one error."""
    from tinymnist.core.config import for_user_model
    from tinymnist.accel.kernels import coverage, use_kernels
    from tinymnist.models.model import ACTIVATIONS

    relu = TrainConfig(model="Model_12").validate().build_model()
    for name in ACTIVATIONS:
        model = TrainConfig(model="Model_12", activation=name).validate().build_model()
        kinds = {type(m) for m in model.modules()}
        assert type(ACTIVATIONS[name]()) in kinds and (name == "relu" or torch.nn.ReLU not in kinds)
        assert model.num_params() == relu.num_params() and model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    silu = TrainConfig(model="Model_12", activation="silu").build_model()
    use_kernels(silu)
    fused = coverage(silu)["batch norm + activation"]
    assert fused["fused"] == fused["of"] > 0  # SiLU fuses with its batch norm on the C kernels, as ReLU does
    with pytest.raises(TinyMnistError, match="unknown activation 'tanh'"):
        TrainConfig(model="Model_12", activation="tanh").validate()
    with pytest.raises(TinyMnistError, match="dropout, layout, activation and bn_affine apply to tinymnist's models only"):
        TrainConfig(model="Mine", models_file="x.py", activation="silu").validate()
    assert for_user_model(TrainConfig(activation="silu"), "Mine").activation == ""


def test_bn_affine_false_takes_each_batch_norms_scale_and_shift_away():
    """A recipe's bn_affine=False: the same network with 2 parameters per batch-norm channel fewer, for any layout;
    a user's own model refuses it."""
    from torch import nn

    from tinymnist.core.config import TrainConfig
    from tinymnist.errors import TinyMnistError

    with_affine = TrainConfig(model="Model_15").build_model()
    without = TrainConfig(model="Model_15", bn_affine=False).build_model()
    channels = sum(m.num_features for m in with_affine.modules() if isinstance(m, nn.BatchNorm2d))
    assert without.num_params() == with_affine.num_params() - 2 * channels
    assert all(not m.affine for m in without.modules() if isinstance(m, nn.BatchNorm2d))
    assert TrainConfig(model="Model_15").recipe()["bn_affine"] is True
    with pytest.raises(TinyMnistError, match="bn_affine"):
        TrainConfig(model="Mine", models_file="x.py", bn_affine=False).validate()


def test_a_skip_connection_adds_its_blocks_input_cropped_to_their_output_and_costs_no_parameters():
    from tinymnist.models.model import Skip, create_model, parse_layout

    plain = "c8 P dw c16/1 dw c16/1 dw c16/1 G o"
    skipped = "c8 P dw c16/1 dw c16/1 +2 dw c16/1 +2 G o"
    assert parse_layout("c8 c8 +1 G o")[2].kind == "skip"
    a, b = create_model("Model_14", layout=plain), create_model("Model_14", layout=skipped)
    assert a.num_params() == b.num_params()
    b.check_shapes()
    skip = next(m for m in b.modules() if isinstance(m, Skip))
    x = torch.randn(2, 16, 9, 9)
    assert torch.equal(skip(x), skip.body(x) + x[..., 1:8, 1:8])  # an unpadded 3x3 takes one pixel off each side
    for bad, why in (("c8 +2 G o", "only 1 conv blocks"), ("c8 c12 +1 G o", "adds 8 channels to 12"),
                     ("c8 P +1 G o", "only 0 conv blocks"), ("c8 +0 G o", "zero size")):
        with pytest.raises(TinyMnistError, match=why):
            create_model("Model_14", layout=bad)
