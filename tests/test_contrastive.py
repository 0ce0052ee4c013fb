"perrep.contrastive: the loss, the embedding it trains, adapters that reload exactly, resuming, and bad inputs refused early."
import json

import numpy as np
import peft
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from perrep.backbones import load_backbone
from perrep.contrastive import (ContrastiveConfig, ContrastiveTrainer, embed_adapted, info_nce, load_adapters, lora_targets,
                                save_adapter, stack_triplets, synthetic_files)
from perrep.testing import ToyColourBackbone, save_tiny_vision_model

TINY = dict(rank=2, lora_alpha=2.0, lora_dropout=0.0, batch_size=2, n_triplets=6, epochs=2, n_synthetic=3, lr=1e-2)


def square(colour, seed, size=40):
    rng = np.random.default_rng(seed)
    image = Image.new("RGB", (size, size), tuple(int(v) for v in rng.integers(90, 170, 3)))
    x, y = rng.integers(2, size // 2, 2)
    ImageDraw.Draw(image).rectangle([x, y, x + size // 2, y + size // 2], fill=colour)
    return image


@pytest.fixture(scope="module")
def vit(tmp_path_factory):
    return save_tiny_vision_model(tmp_path_factory.mktemp("vit") / "dinov2", model_type="dinov2")


@pytest.fixture(scope="module")
def images():
    return dict(anchors=[square((200, 30, 30), s) for s in range(3)], positives=[square((190, 40, 40), s) for s in range(10, 13)],
                negatives=[square((30, 30, 200), s) for s in range(20, 23)])


def test_info_nce_equals_a_per_positive_cross_entropy():
    "The official InfoNCELoss: for each positive k, CE over [a·p_k, a·n_1..n_B]/τ with target 0, averaged."
    g = torch.Generator().manual_seed(1)
    a, p, n = torch.randn(5, 6, generator=g), torch.randn(5, 6, generator=g), torch.randn(7, 6, generator=g)
    an, pn, nn_ = (F.normalize(x, dim=-1) for x in (a, p, n))
    expected = np.mean([F.cross_entropy(torch.cat([an @ pn[k:k + 1].T, an @ nn_.T], 1) / 0.07, torch.zeros(5, dtype=torch.long)).item()
                        for k in range(5)])
    assert info_nce(a, p, n, temperature=0.07).item() == pytest.approx(expected, rel=1e-5)


def test_training_and_evaluation_use_the_same_embedding(vit, images, tmp_path):
    "The official code trains on CLS ⊕ mean-patch and evaluates CLS alone; here the loss sees exactly what evaluation scores."
    trainer = ContrastiveTrainer(load_backbone(vit), config=ContrastiveConfig(**TINY), **images)
    trainer.train(work_dir=tmp_path / "work", progress=False)
    adapter = save_adapter(trainer.model, tmp_path / "adapter", params={})
    evaluated = load_adapters(load_backbone(vit), {"a": adapter})
    hidden = evaluated.base_model.model.model.config.hidden_size
    with torch.no_grad():
        seen_by_loss = trainer.embed(trainer.backbone.preprocess(images["anchors"]))            # (3, D) through the training path
    scored = embed_adapted(evaluated, images["anchors"], batch_size=2)["a"]                     # (3, D) through the evaluation path
    assert seen_by_loss.shape == scored.shape == (3, 2 * hidden)                                # CLS and mean patch, both
    torch.testing.assert_close(seen_by_loss, scored, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(scored[:, :hidden], scored[:, hidden:])


def test_adapter_starts_at_zero_and_training_moves_it_and_lowers_the_loss(vit, images, tmp_path):
    base = load_backbone(vit)
    trainer = ContrastiveTrainer(load_backbone(vit), config=ContrastiveConfig(**TINY), **images)
    with torch.no_grad():
        x = base.preprocess(images["negatives"])
        assert torch.equal(trainer.model.eval()(x)[0], base(x)[0])                                # B = 0: exactly the pretrained model
        before = info_nce(*[trainer.model(base.preprocess(images[k]))[0] for k in ("anchors", "positives", "negatives")])
    log = trainer.train(work_dir=tmp_path, progress=False)
    with torch.no_grad():
        after = info_nce(*[trainer.model(base.preprocess(images[k]))[0] for k in ("anchors", "positives", "negatives")])
    assert len(log) == ContrastiveConfig(**TINY).steps == 6
    assert after < before


def test_saved_adapter_reloads_bit_identically_and_names_its_backbone(vit, images, tmp_path):
    trainer = ContrastiveTrainer(load_backbone(vit), config=ContrastiveConfig(**TINY), **images)
    trainer.train(work_dir=tmp_path / "w", progress=False)
    first = save_adapter(trainer.model, tmp_path / "a", params={"x": 1})
    second = save_adapter(load_adapters(load_backbone(vit), {"default": first}), tmp_path / "b", params={"x": 1})
    for name in ("adapter_model.safetensors", "adapter_config.json", "params.json"):
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
    assert json.loads((first / "adapter_config.json").read_text())["base_model_name_or_path"] == str(vit)
    reloaded = load_adapters(load_backbone(vit), {"default": first})
    with torch.no_grad():
        x = trainer.backbone.preprocess(images["anchors"])
        assert torch.equal(reloaded(x)[0], trainer.model.eval()(x)[0])


def test_a_killed_run_resumes_to_the_same_adapter(vit, images, tmp_path):
    config = ContrastiveConfig(**TINY)
    whole = ContrastiveTrainer(load_backbone(vit), config=config, **images)
    whole.train(work_dir=tmp_path / "whole", progress=False)
    killed = ContrastiveTrainer(load_backbone(vit), config=config, **images)
    real_loss = killed.loss
    def dies_at_step_3(step):
        if step == 3: raise KeyboardInterrupt
        return real_loss(step)
    killed.loss = dies_at_step_3
    with pytest.raises(KeyboardInterrupt):
        killed.train(work_dir=tmp_path / "resumed", checkpoint_every=2, progress=False)
    resumed = ContrastiveTrainer(load_backbone(vit), config=config, **images)
    log = resumed.train(work_dir=tmp_path / "resumed", checkpoint_every=2, progress=False)
    assert len(log) == config.steps
    a = peft.get_peft_model_state_dict(whole.model)
    b = peft.get_peft_model_state_dict(resumed.model)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_bad_inputs_fail_before_training(vit, images, tmp_path):
    empty = tmp_path / "empty"; empty.mkdir()
    with pytest.raises(FileNotFoundError, match="empty.*no images"):
        synthetic_files([empty], n=3, seed=0)
    with pytest.raises(ValueError, match=r"negatives=\.\.\.\): got an empty list"):
        ContrastiveTrainer(load_backbone(vit), anchors=images["anchors"], positives=images["positives"], negatives=[], config=ContrastiveConfig(**TINY))
    with pytest.raises(ValueError, match="images of mismatched size in one batch"):
        stack_triplets(torch.zeros(2, 3, 224, 224), torch.zeros(2, 3, 256, 256), torch.zeros(2, 3, 224, 224))
    with pytest.raises(TypeError, match="ToyColourBackbone is not a backbone perrep knows how to adapt"):
        lora_targets(ToyColourBackbone())
    with pytest.raises((ValueError, OSError), match="no-such-backbone"):
        load_backbone("no-such-backbone")
    with pytest.raises(FileNotFoundError, match="no peft adapter"):
        load_adapters(load_backbone(vit), {"x": tmp_path})
