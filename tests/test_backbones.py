"perrep.backbones: one contract for every backbone, checked against the libraries and the real EfficientNet weights."
import time

import numpy as np
import pytest
import torch
import transformers
from PIL import Image
from skimage import data as skdata

from perrep.backbones import (EFFICIENTNET_NAME, VISION_MODEL_TYPES, EfficientNetLite0, ImageTransform,
                              efficientnet_lite0_weights, load_backbone)
from perrep.core import derive_rng
from perrep.testing import TINY_VISION_MODELS, TINY_WIDTH, save_tiny_vision_model

HIDDEN = TINY_WIDTH["hidden_size"]
PATCH = {"dinov2": 14, "dinov2_with_registers": 14, "clip": 16, "clip_vision_model": 16, "vit_mae": 16, "vit": 16}


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {t: save_tiny_vision_model(root / t, model_type=t) for t in TINY_VISION_MODELS}


@pytest.fixture(scope="module")
def images():
    "8 real photos of assorted sizes and modes (random crops of scikit-image's photos, one greyscale)."
    rng = derive_rng(0, "test-backbones")
    sources = [skdata.chelsea(), skdata.coffee(), skdata.astronaut(), skdata.rocket()]
    out = []
    for i in range(8):
        photo = Image.fromarray(sources[i % 4])
        w, h = int(rng.integers(120, photo.width)), int(rng.integers(120, photo.height))
        x, y = int(rng.integers(0, photo.width - w + 1)), int(rng.integers(0, photo.height - h + 1))
        out.append(photo.crop((x, y, x + w, y + h)))
    out[3] = out[3].convert("L")
    return out


@pytest.fixture(scope="module")
def effnet():
    return load_backbone(EFFICIENTNET_NAME)


def test_supported_types_are_the_tiny_ones():
    assert set(TINY_VISION_MODELS) == set(VISION_MODEL_TYPES)


@pytest.mark.parametrize("model_type", sorted(TINY_VISION_MODELS))
def test_transformer_contract_and_library_cross_check(tiny_dirs, images, model_type):
    backbone = load_backbone(str(tiny_dirs[model_type]))
    assert backbone.name == str(tiny_dirs[model_type]) and backbone.global_dim == 2 * HIDDEN and backbone.image_size == 224
    assert not backbone.training
    pixels = backbone.preprocess(images[:2])
    assert pixels.shape == (2, 3, 224, 224) and pixels.dtype == torch.float32
    global_, dense = backbone.embed(images[:2])
    side = 224 // PATCH[model_type]
    assert global_.shape == (2, 2 * HIDDEN) and dense.shape == (2, HIDDEN, side, side)
    assert global_.dtype == dense.dtype == torch.float32 and global_.device.type == "cpu"

    # the library's own forward pass on the same pixels (MAE: its random shuffle, undone with its ids_restore)
    folder = tiny_dirs[model_type]
    with torch.no_grad():
        if model_type in ("clip", "clip_vision_model"):
            out = transformers.CLIPVisionModel.from_pretrained(folder)(pixel_values=pixels)
            cls, patches = out.pooler_output, backbone.model.post_layernorm(out.last_hidden_state)[:, 1:]
        elif model_type == "vit_mae":
            out = transformers.ViTMAEModel.from_pretrained(folder, mask_ratio=0.0)(pixel_values=pixels)
            index = out.ids_restore[..., None].expand(-1, -1, HIDDEN)
            cls, patches = out.last_hidden_state[:, 0], torch.gather(out.last_hidden_state[:, 1:], 1, index)
        else:
            model_class = {"dinov2": transformers.Dinov2Model, "dinov2_with_registers": transformers.Dinov2WithRegistersModel,
                           "vit": transformers.ViTModel}[model_type]
            hidden = model_class.from_pretrained(folder)(pixel_values=pixels).last_hidden_state
            n_registers = 4 if model_type == "dinov2_with_registers" else 0
            assert hidden.shape[1] == 1 + n_registers + side * side
            cls, patches = hidden[:, 0], hidden[:, 1 + n_registers:]
    torch.testing.assert_close(global_[:, :HIDDEN], cls, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(global_[:, HIDDEN:], patches.mean(1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dense.flatten(2).transpose(1, 2), patches, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("model_type", ["dinov2", "clip", "vit_mae"])
def test_deterministic_and_batch_invariant(tiny_dirs, images, model_type):
    backbone = load_backbone(tiny_dirs[model_type])
    one = backbone.embed(images, batch_size=1)
    eight = backbone.embed(images, batch_size=8)
    again = backbone.embed(images, batch_size=3)
    for a, b, c in zip(one, eight, again):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(b, c, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(backbone.embed(images)[0], eight[0], atol=0, rtol=0)  # same input, same bytes


def test_normalisation_read_from_saved_processor(tiny_dirs, tmp_path):
    vit = load_backbone(tiny_dirs["vit"])  # google/vit-base's processor: mean = std = 0.5
    assert vit.transform == ImageTransform(resize=256, crop=224, mean=(0.5,) * 3, std=(0.5,) * 3)
    clip = load_backbone(tiny_dirs["clip"])
    assert clip.transform.resize == 224 and clip.transform.mean == pytest.approx((0.48145466, 0.4578275, 0.40821073))
    bare = save_tiny_vision_model(tmp_path / "bare", model_type="dinov2")
    (bare / "preprocessor_config.json").unlink()
    assert load_backbone(bare).transform.std == (0.229, 0.224, 0.225)  # no saved processor: the ImageNet default


def test_preprocess_matches_pil_with_torchvision_geometry(images):
    "PRPG's torchvision Resize(256) + CenterCrop(224) done in PIL, image by image, against our batched torch version."
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    ours = ImageTransform(resize=256, crop=224, mean=mean, std=std)(images)  # (8, 3, 224, 224)
    for image, x in zip(images, ours):
        w, h = image.size
        new_h, new_w = (256, int(256 * w / h)) if h <= w else (int(256 * h / w), 256)  # torchvision's Resize(int)
        top, left = int(round((new_h - 224) / 2)), int(round((new_w - 224) / 2))  # torchvision's CenterCrop
        crop = image.convert("RGB").resize((new_w, new_h), Image.BICUBIC).crop((left, top, left + 224, top + 224))
        reference = torch.from_numpy(np.asarray(crop, dtype=np.float32)).permute(2, 0, 1)  # (3, 224, 224) in [0, 255]
        ours_levels = (x * torch.tensor(std).view(3, 1, 1) + torch.tensor(mean).view(3, 1, 1)) * 255
        difference = (ours_levels - reference).abs()
        assert difference.mean() < 0.5 and difference.max() < 16, (image.size, difference.mean(), difference.max())


def test_dtype_and_training_mode(tiny_dirs, images):
    backbone = load_backbone(tiny_dirs["dinov2"], dtype=torch.bfloat16)
    assert next(backbone.parameters()).dtype == torch.bfloat16
    global_, dense = backbone.embed(images[:2])
    assert global_.dtype == dense.dtype == torch.float32
    backbone.train()
    backbone.embed(images[:1])
    assert backbone.training  # embed runs in eval mode and gives the mode back


def test_bad_names_fail_at_once_and_say_why(tmp_path):
    start = time.time()
    with pytest.raises(ValueError, match="efficientnet-lite0.*save_pretrained.*hub id"): load_backbone("dinov2_vitb14")
    with pytest.raises(ValueError, match="HF_HUB_OFFLINE"): load_backbone("facebook/no-such-model-here")
    with pytest.raises(ValueError, match=str(tmp_path)): load_backbone(tmp_path)  # a folder, not a model
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="is a file"): load_backbone(tmp_path / "notes.txt")
    assert time.time() - start < 2
    with pytest.raises(ValueError, match="dtype"): load_backbone(EFFICIENTNET_NAME, dtype=torch.int8)


def test_unsupported_model_type_and_missing_weights(tmp_path):
    transformers.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64).save_pretrained(tmp_path / "bert")
    with pytest.raises(ValueError, match="'bert' model; supported"): load_backbone(tmp_path / "bert")
    transformers.Dinov2Config(**TINY_WIDTH).save_pretrained(tmp_path / "empty")
    with pytest.raises(OSError, match="model.safetensors"): load_backbone(tmp_path / "empty")
    torch.manual_seed(0)
    transformers.Dinov2Model(transformers.Dinov2Config(**TINY_WIDTH)).save_pretrained(tmp_path / "mismatch")
    transformers.Dinov2WithRegistersConfig(**TINY_WIDTH, num_register_tokens=4).save_pretrained(tmp_path / "mismatch")
    with pytest.raises(ValueError, match="do not fit Dinov2WithRegistersModel: missing.*register_tokens"): load_backbone(tmp_path / "mismatch")
    transformers.Dinov2Config(**dict(TINY_WIDTH, hidden_size=48)).save_pretrained(tmp_path / "mismatch")
    with pytest.raises(ValueError, match="wrong shape.*cls_token"): load_backbone(tmp_path / "mismatch")


def test_bad_images_are_named(effnet, images):
    with pytest.raises(TypeError, match=r"images\[1\] is a ndarray"): effnet.embed([images[0], skdata.coffee()])
    with pytest.raises(TypeError, match="list of PIL images"): effnet.embed(images[0])
    with pytest.raises(ValueError, match="empty"): effnet.embed([])
    with pytest.raises(ValueError, match="batch_size"): effnet.embed(images, batch_size=0)


def test_efficientnet_real_weights_load_strictly():
    model = EfficientNetLite0()
    state = torch.load(efficientnet_lite0_weights(), map_location="cpu", weights_only=True)
    result = model.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert sum(p.numel() for p in model.parameters()) == 4_652_008
    assert sum(v.numel() for v in state.values()) == 4_694_073  # with BatchNorm statistics: the package's 4.69 M
    assert model._fc.out_features == 1000


def test_efficientnet_classifies_real_photos(effnet):
    photos = [Image.fromarray(skdata.chelsea()), Image.fromarray(skdata.coffee())]
    top1 = effnet.classify(photos).argmax(-1).tolist()
    assert 281 <= top1[0] <= 285, f"chelsea -> ImageNet class {top1[0]}, not a cat (281-285)"
    assert top1[1] == 967, f"coffee -> ImageNet class {top1[1]}, not espresso (967)"


def test_efficientnet_contract(effnet, images):
    assert (effnet.name, effnet.image_size, effnet.global_dim) == (EFFICIENTNET_NAME, 224, 1280)
    one = effnet.embed(images, batch_size=1)
    eight = effnet.embed(images, batch_size=8)
    assert one[0].shape == (8, 1280) and one[1].shape == (8, 1280, 7, 7)
    for a, b in zip(one, eight): torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(one[0], one[1].mean((2, 3)), atol=1e-5, rtol=1e-5)  # global = pooled dense
    global_, dense = effnet(torch.zeros(1, 3, 448, 320))  # fully convolutional: any size
    assert global_.shape == (1, 1280) and dense.shape == (1, 1280, 14, 10)


def test_efficientnet_normalisation_matches_the_weights(effnet, images):
    "The stem BatchNorm remembers the variance of its ImageNet input: our preprocessing must reproduce it."
    with torch.no_grad(): stem = effnet.model._conv_stem(effnet.preprocess(images))  # (8, 32, 112, 112)
    ratio = (stem.var((0, 2, 3)) / effnet.model._bn0.running_var).median().item()
    assert 0.6 < ratio < 1.5, f"stem variance is {ratio:.2f}x what the weights were trained on: wrong mean/std"


def test_same_padding_is_tensorflows():
    "TF 'SAME' with stride 2 on an even size pads only right/bottom: output (0, 0) is centred on input (1, 1)."
    from perrep.backbones import SamePadConv2d
    conv = SamePadConv2d(1, 1, 3, stride=2, bias=False)
    with torch.no_grad(): conv.weight.zero_(); conv.weight[0, 0, 0, 0] = 1  # picks the top-left tap
    x = torch.arange(1, 65, dtype=torch.float32).view(1, 1, 8, 8)
    out = conv(x)
    assert out.shape == (1, 1, 4, 4) and out[0, 0, 0, 0] == x[0, 0, 0, 0] and out[0, 0, 1, 1] == x[0, 0, 2, 2]
    assert conv(torch.ones(1, 1, 7, 7)).shape == (1, 1, 4, 4)  # ceil(7 / 2)
