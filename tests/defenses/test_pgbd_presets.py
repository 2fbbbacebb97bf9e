"""PGBD presets (REFERENCE.md "PGBD"): ``pgbd`` = the authors' code defaults, ``pgbd_paper`` = the paper as
written, ``pgbd_lambda0`` = the CE-only control. Block-output activation, a mapping with bias that takes
exactly the configured number of optimiser steps, refresh off by default, fp32."""

from __future__ import annotations

import copy

import pytest
import torch
from omegaconf import OmegaConf

from bdseal.cache import ArtifactCache
from bdseal.data.dataset import ImageDataset
from bdseal.defenses import DefenderView, RunContext, get_defense
from bdseal.defenses.pgbd import mapping as mp
from bdseal.defenses.pgbd.defense import Sanitiser, _Hooks
from bdseal.defenses.pgbd.pav import layer_activations, resolve_layer
from bdseal.experiment.config import compose_config
from bdseal.models import build_model
from bdseal.train.loop import TrainConfig, fit

K = 3


def _preset(name: str) -> dict:
    return OmegaConf.to_container(compose_config([f"defense={name}"]).defense, resolve=True)


def _preact(final_bn: bool = False) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model("preact_resnet18", K, image_size=16, width=8, final_bn=final_bn).eval()


def _data(n_per: int = 6, seed: int = 0) -> ImageDataset:
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(K).repeat_interleave(n_per)
    x = (torch.rand(len(y), 3, 16, 16, generator=g) * 80 + y.view(-1, 1, 1, 1) * 60).to(torch.uint8)
    return ImageDataset(x, y, [str(c) for c in range(K)])


def _ctx(tmp_path, epochs: int = 1) -> RunContext:
    tc = TrainConfig.from_dict({"epochs": epochs, "batch_size": 6, "progress": False, "augment": "none"})
    return RunContext(device=torch.device("cpu"), seed=0, build_model=lambda num_classes=None: _preact(), train_cfg=tc,
                      cache=ArtifactCache(tmp_path, enabled=True), progress=False, log=lambda s: None)


@pytest.mark.parametrize("final_bn", [False, True])
def test_block_output_hook_equals_the_blocks_output_tensor(final_bn: bool) -> None:
    """The authors hook layer4.1.conv2, whose output the block overwrites in place with conv2 + shortcut:
    the activation PGBD uses is the last block's output, not the raw conv output."""
    model = _preact(final_bn)
    layer = resolve_layer(model, _preset("pgbd")["layer"])
    assert layer == "stages.layer4.1"
    block = model.stages.layer4[1]
    seen: dict[str, torch.Tensor] = {}
    h1 = block.register_forward_hook(lambda m, i, o: seen.setdefault("block", o))
    h2 = block.conv2.register_forward_hook(lambda m, i, o: seen.setdefault("conv2", o))
    x = torch.rand(4, 3, 16, 16)
    with torch.no_grad():
        _, acts = model.forward_with(x, [layer])
    h1.remove(), h2.remove()
    torch.testing.assert_close(acts[layer], seen["block"])
    assert not torch.allclose(acts[layer], seen["conv2"])  # the shortcut is part of it
    torch.testing.assert_close(layer_activations(model, x, layer), seen["block"])
    if not final_bn:  # BackdoorBench layout: the block output is layer4's output
        torch.testing.assert_close(model.forward_with(x, ["layer4"])[1]["layer4"], seen["block"])
    assert resolve_layer(model, "last_conv") == "stages.layer4.1.conv2"
    small = build_model("small_half", K, image_size=16)
    assert resolve_layer(small, "block_output") == "block3"  # no residual blocks: the stage output


@pytest.mark.parametrize("step_per,expected", [("epoch", 5), ("batch", 5 * 3)])
def test_mapping_has_bias_and_takes_exactly_the_configured_steps(step_per: str, expected: int) -> None:
    g = torch.Generator().manual_seed(1)
    t, s = torch.randn(40, 8, 4, 4, generator=g), torch.randn(40, 6, 4, 4, generator=g)
    lr = 1e-4
    res = mp.fit_mapping(t, s, epochs=5, lr=lr, batch_size=16, step_per=step_per, seed=3)
    assert res.steps == expected and len(res.losses) == 5
    assert res.mapping.E.bias is not None and res.mapping.D.bias is not None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        init = mp.Mapping(6, 8)
    moved = max(float((p - q).detach().abs().max()) for p, q in zip(res.mapping.parameters(), init.parameters()))
    assert 0 < moved <= expected * lr * 1.01  # Adam moves a weight by at most ~lr per step
    if step_per == "epoch":  # five steps: still next to the random initialisation
        assert moved <= 5.05 * lr


def test_mapping_pav_with_bias_is_affine_in_p_minus_q() -> None:
    m = mp.Mapping(6, 8)
    P, Q = torch.randn(3, 6 * 4 * 4), torch.randn(3, 6 * 4 * 4)
    V = m.pav(P, Q, (6, 4, 4))
    with torch.no_grad():
        lin = torch.nn.functional.conv_transpose2d(
            torch.nn.functional.conv2d((P - Q).view(-1, 6, 4, 4), m.D.weight, padding=1), m.E.weight, padding=1)
    torch.testing.assert_close(V, (lin + m.E.bias.view(1, -1, 1, 1)).flatten(1))


def test_presets() -> None:
    authors, paper, lam0 = _preset("pgbd"), _preset("pgbd_paper"), _preset("pgbd_lambda0")
    assert authors["update_every"] == 0 and authors["mapping"]["enabled"] and authors["mapping"]["step_per"] == "epoch"
    assert authors["mapping"]["epochs"] == 5 and authors["mapping"]["bias"] and authors["train"]["amp"] is False
    assert paper["update_every"] == 5 and paper["refresh"] == "weighted" and paper["alpha"] == 0.75
    assert not paper["mapping"]["enabled"] and paper["train"] == authors["train"]
    assert lam0["lam"] == 0 and lam0["train"] == authors["train"]
    assert _preset("nt_pgbd")["cycle_every"] == 3


def _protos_after(cfg: dict, tmp_path, epochs: int) -> tuple[torch.Tensor, torch.Tensor]:
    clean, model = _data(), _preact()
    ctx = _ctx(tmp_path, epochs)
    san = Sanitiser("pgbd", model, clean, cfg, ctx, None, 0)
    before = san.state.protos.clone()
    fit(model, clean.x, clean.y, ctx.train_cfg.replace(lr=0.01, amp=False), loss_fn=san.loss_fn,
        hooks=_Hooks(san, None), seed=0)
    return before, san.state.protos


def test_refresh_is_off_by_default_and_weighted_in_the_paper_preset(tmp_path) -> None:
    cfg = {**_preset("pgbd"), "mapping": {"enabled": False}}
    before, after = _protos_after(cfg, tmp_path, epochs=2)
    assert torch.equal(before, after)  # no refresh: the prototypes of M_B are kept
    paper = {**_preset("pgbd_paper"), "update_every": 1}
    before, after = _protos_after(paper, tmp_path, epochs=1)
    assert not torch.allclose(before, after)


def test_pgbd_default_runs_the_mapping_with_five_steps_on_the_block_output(tmp_path) -> None:
    cfg = _preset("pgbd")
    cfg["train"] = {**cfg["train"], "epochs": 1, "batch_size": 6}
    cfg["mapping"]["teacher"] = {**cfg["mapping"]["teacher"], "epochs": 1}
    clean, model = _data(), _preact()
    view = DefenderView(train=clean, clean=clean, backdoored_model=copy.deepcopy(model), known_target=0)
    res = get_defense("pgbd").fn(view, cfg, _ctx(tmp_path))
    assert res.extras["mapping_steps"] == 5 and len(res.extras["mapping_losses"]) == 5
    assert res.extras["layer"] == "stages.layer4.1"
    lam0 = _preset("pgbd_lambda0")
    lam0["train"] = cfg["train"]
    view = DefenderView(train=clean, clean=clean, backdoored_model=copy.deepcopy(model))  # no target: no NC needed
    out = get_defense("pgbd_lambda0").fn(view, lam0, _ctx(tmp_path))
    assert out.extras["lam"] == 0.0 and not out.model.training
    assert any(not torch.equal(p, q) for p, q in zip(out.model.parameters(), model.parameters()))


def test_clean_accuracy_without_target_class_images() -> None:
    """PGBD's CA leaves out the target class's test images (REFERENCE); ``clean_acc`` keeps them."""
    from bdseal import metrics as M

    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    pred = torch.tensor([0, 0, 1, 0, 2, 0])  # the backdoored-style errors all go to target 0
    assert M.accuracy(pred, labels) == pytest.approx(4 / 6)
    assert M.nontarget_accuracy(pred, labels, [0]) == pytest.approx(2 / 4)
    assert M.nontarget_accuracy(pred, labels, []) == pytest.approx(4 / 6)
    assert M.nontarget_accuracy(pred, labels, [0, 1, 2]) != M.nontarget_accuracy(pred, labels, [0, 1, 2])  # NaN
