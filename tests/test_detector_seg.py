import json

import numpy as np
import pytest
import torch

from models.detectors.seg import ADE20K_PALETTE, FILES, SegDetector
from tests.conftest import drawing


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("upernet-convnext-small")
    SegDetector.save_random(folder)
    return folder


@pytest.fixture(scope="module")
def detector(folder):
    return SegDetector.from_weights(folder)


@pytest.fixture(scope="module")
def image():
    # Neither square nor a multiple of 64, unlike what the processor resizes to.
    return np.array(drawing(width=200, height=136))


def test_save_random_writes_the_real_repos_files(folder):
    assert sorted(path.name for path in folder.iterdir()) == sorted(FILES)
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "upernet"
    assert config["backbone_config"]["model_type"] == "convnext"
    assert len(config["id2label"]) == 150
    preprocessor = json.loads((folder / "preprocessor_config.json").read_text())
    assert preprocessor["image_processor_type"] == "SegformerImageProcessor"
    assert preprocessor["size"] == {"height": 512, "width": 512}


def test_from_weights_loads_the_saved_network(folder, detector):
    saved = torch.load(folder / "pytorch_model.bin", weights_only=True)
    loaded = detector.model.state_dict()
    assert loaded  # the training-only auxiliary head is dropped, everything else must match
    for name, tensor in loaded.items():
        assert torch.equal(tensor.cpu(), saved[name]), name


def test_missing_weights_say_how_to_get_them(tmp_path):
    with pytest.raises(FileNotFoundError, match="make weights COND=seg"):
        SegDetector.from_weights(tmp_path)


@pytest.fixture(scope="module")
def seg(detector, image):
    return detector(image)


def test_map_has_the_input_size_and_only_palette_colours(seg, image):
    assert seg.shape == image.shape
    assert seg.dtype == np.uint8
    colours = {tuple(colour) for colour in seg.reshape(-1, 3)}
    assert colours <= {tuple(colour) for colour in ADE20K_PALETTE}
    assert len(colours) > 1  # the random network does tell regions apart


def test_same_image_same_map(detector, image, seg):
    assert np.array_equal(detector(image.copy()), seg)


def test_palette_is_mmsegs_ade20k_palette():
    assert ADE20K_PALETTE.shape == (150, 3)
    assert ADE20K_PALETTE.dtype == np.uint8
    assert tuple(ADE20K_PALETTE[0]) == (120, 120, 120)  # wall
    assert tuple(ADE20K_PALETTE[2]) == (6, 230, 230)  # sky
    assert tuple(ADE20K_PALETTE[149]) == (92, 0, 255)  # flag
    colours, counts = np.unique(ADE20K_PALETTE, axis=0, return_counts=True)
    # mmseg paints road (6) and skyscraper (48) the same grey; every other class has its own colour.
    assert len(colours) == 149
    assert colours[counts > 1].tolist() == [[140, 140, 140]]
    assert np.flatnonzero((ADE20K_PALETTE == (140, 140, 140)).all(axis=1)).tolist() == [6, 48]
