"""The MiDaS estimator shared by depth and normal: lllyasviel's network, at the widths its file holds."""

import re

import numpy as np
import pytest
import torch
from controlnet_aux.midas.midas.dpt_depth import DPTDepthModel

from models.midas import WEIGHTS_FILE, MidasDepth, Widths, network
from tests.conftest import drawing


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("annotators-midas")
    MidasDepth.save_random(folder)
    return folder


@pytest.fixture(scope="module")
def estimator(folder):
    return MidasDepth.from_weights(folder)


# controlnet_aux asks timm for the model by its pre-1.0 name.
@pytest.mark.filterwarnings("ignore:Mapping deprecated model name")
def test_real_widths_rebuild_controlnet_aux_dpt_hybrid_module_for_module():
    """So the real file, which controlnet_aux's DPTDepthModel(backbone="vitb_rn50_384") loads, loads here."""
    with torch.device("meta"):
        theirs = DPTDepthModel(path=None, backbone="vitb_rn50_384", non_negative=True)
        ours = network()
    assert repr(ours).split("\n", 1)[1] == repr(theirs).split("\n", 1)[1]  # all but the class name
    their_state, our_state = theirs.state_dict(), ours.state_dict()
    assert list(our_state) == list(their_state)
    assert all(our_state[key].shape == their_state[key].shape for key in their_state)
    assert Widths.of(their_state) == Widths()


def test_tiny_file_is_a_bare_state_dict_with_the_real_key_names(folder, estimator):
    assert sorted(p.name for p in folder.iterdir()) == [WEIGHTS_FILE]
    saved = torch.load(folder / WEIGHTS_FILE, weights_only=True)
    with torch.device("meta"):
        real_keys = list(network().state_dict())
    # Fewer R50 blocks per stage, so a subset of the real keys; each kind of tensor is there.
    assert set(saved) <= set(real_keys)
    assert {re.sub(r"blocks\.\d+", "blocks.N", key) for key in saved} == {
        re.sub(r"blocks\.\d+", "blocks.N", key) for key in real_keys
    }
    loaded = estimator.model.state_dict()
    assert all(torch.equal(saved[key], loaded[key].cpu()) for key in saved)
    assert Widths.of(saved) != Widths()  # and it is tiny
    assert (folder / WEIGHTS_FILE).stat().st_size < 5e6


def test_depth_is_predicted_at_the_image_size_any_aspect(estimator):
    for width, height in [(256, 192), (192, 320), (128, 128)]:
        depth = estimator.depth(np.asarray(drawing(width, height)))
        assert depth.shape == (height, width) and depth.dtype == np.float32
        assert depth.min() >= 0  # MiDaS's head ends in a ReLU: inverse depth is never negative
        assert depth.std() > 0


class Recorder(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(()))

    def forward(self, x):
        self.seen = x.clone()
        return x.mean(dim=1) * self.weight


def test_network_sees_rgb_scaled_to_minus_one_one_without_resizing():
    """lllyasviel's annotator fed x / 127.5 - 1, RGB order, at the detect-resolution size."""
    image = np.zeros((64, 128, 3), np.uint8)
    image[..., 0], image[..., 2] = 255, 0
    image[:, 64:, 1] = 255
    recorder = Recorder()
    MidasDepth(recorder).depth(image)
    assert recorder.seen.shape == (1, 3, 64, 128)
    assert torch.equal(recorder.seen[0, 0], torch.ones(64, 128))
    assert torch.equal(recorder.seen[0, 2], -torch.ones(64, 128))
    assert torch.equal(recorder.seen[0, 1, :, 64:], torch.ones(64, 64))
    assert torch.equal(recorder.seen[0, 1, :, :64], -torch.ones(64, 64))


def test_loaded_weights_drive_the_depth(estimator, tmp_path):
    MidasDepth.save_random(tmp_path, seed=1)
    image = np.asarray(drawing(128, 128))
    assert not np.array_equal(estimator.depth(image), MidasDepth.from_weights(tmp_path).depth(image))
    np.testing.assert_array_equal(estimator.depth(image), estimator.depth(image.copy()))
