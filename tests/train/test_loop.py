import pytest
import torch

from bdseal.data import load_dataset
from bdseal.errors import BdsealError, ConfigError, TrainingDivergedError
from bdseal.io import load_tree
from bdseal.models import build_model
from bdseal.train import TrainConfig, TrainHooks, fit, predict
from bdseal.train.schedule import lr_multiplier


def _small_run(tmp_path=None, epochs=3, **kw):
    s = load_dataset("synthetic")
    torch.manual_seed(0)
    m = build_model("small_half", s.num_classes, mean=[0.5] * 3, std=[0.25] * 3)
    cfg = TrainConfig(epochs=epochs, batch_size=64, lr=0.05, progress=False, **kw)
    return s, m, cfg


def test_fit_learns_and_is_deterministic():
    s, m, cfg = _small_run()
    fit(m, s.train.x, s.train.y, cfg, seed=0)
    acc = (predict(m, s.test.x) == s.test.y).float().mean()
    assert acc > 0.8
    _, m2, _ = _small_run()
    fit(m2, s.train.x, s.train.y, cfg, seed=0)
    for a, b in zip(m.parameters(), m2.parameters()):
        assert torch.equal(a, b)


def test_zero_weights_mean_no_learning_and_hooks_fire():
    s, m, cfg = _small_run(epochs=1)
    before = [p.detach().clone() for p in m.head.parameters()]
    seen = []

    class H(TrainHooks):
        def on_epoch_end(self, state):
            seen.append(state.epoch)

    fit(m, s.train.x, s.train.y, cfg.replace(weight_decay=0.0, momentum=0.0), weights=torch.zeros(len(s.train)), hooks=H())
    assert seen == [0]
    for a, b in zip(before, m.head.parameters()):
        assert torch.equal(a, b)


def test_interrupted_run_resumes_to_the_same_weights(tmp_path):
    s, m_full, cfg = _small_run(epochs=2, augment="none")
    fit(m_full, s.train.x, s.train.y, cfg, seed=3)

    class Interrupt(TrainHooks):
        def on_epoch_start(self, state):
            if state.epoch == 1:
                raise KeyboardInterrupt

    _, m_a, _ = _small_run()
    ck = tmp_path / "ck.pt"
    try:
        fit(m_a, s.train.x, s.train.y, cfg, seed=3, checkpoint=ck, hooks=Interrupt())
    except KeyboardInterrupt:
        pass
    assert load_tree(ck)[0]["epoch"] == 1
    _, m_b, _ = _small_run()
    fit(m_b, s.train.x, s.train.y, cfg, seed=3, checkpoint=ck, resume=True)
    for a, b in zip(m_full.parameters(), m_b.parameters()):
        assert torch.equal(a, b)


def test_schedules():
    cos = lr_multiplier("cosine", 100, 10)
    assert cos(0) == 1.0 and abs(cos(100)) < 1e-9
    step = lr_multiplier("step", 100, 10, milestones=[5, 8], gamma=0.1)
    assert step(49) == 1.0 and abs(step(50) - 0.1) < 1e-12 and abs(step(80) - 0.01) < 1e-12


def test_resume_with_random_augmentation_and_dropout_equals_uninterrupted(tmp_path):
    """The checkpoint carries the augmentation generator and the global RNGs (dropout), not just the
    data-order generator: resuming after epoch 1 reproduces the uninterrupted weights bit for bit."""
    s = load_dataset("synthetic")
    x, y = s.train.x[:256], s.train.y[:256]

    def model():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Dropout(0.3), torch.nn.Linear(x[0].numel(), s.num_classes))

    cfg = TrainConfig(epochs=3, batch_size=64, lr=0.05, augment="crop_flip", channels_last=False, progress=False)
    m_full = model()
    fit(m_full, x, y, cfg, seed=5)

    class Interrupt(TrainHooks):
        def on_epoch_start(self, state):
            if state.epoch == 1:
                raise KeyboardInterrupt

    ck = tmp_path / "ck.safetensors"
    with pytest.raises(KeyboardInterrupt):
        fit(model(), x, y, cfg, seed=5, checkpoint=ck, hooks=Interrupt())
    torch.manual_seed(123)  # whatever the process did in between
    m_b = model()
    fit(m_b, x, y, cfg, seed=5, checkpoint=ck, resume=True)
    for a, b in zip(m_full.parameters(), m_b.parameters()):
        assert torch.equal(a, b)


def test_degenerate_training_options_are_refused_naming_the_option():
    for kw, key in (({"epochs": 0}, "epochs=0"), ({"batch_size": 0}, "batch_size=0"), ({"lr": float("nan")}, "lr=nan"),
                    ({"epochs": "abc"}, "epochs='abc'"), ({"lr": -1.0}, "lr=-1.0"), ({"steps": 0}, "steps=0")):
        with pytest.raises(ConfigError, match=key):
            TrainConfig(**kw)
    assert issubclass(ConfigError, BdsealError)
    assert TrainConfig(epochs=0, steps=5).steps == 5  # an iteration budget replaces epochs


def test_non_finite_loss_stops_training_naming_epoch_step_and_lr():
    s = load_dataset("synthetic")
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(s.train.x[0].numel(), 64), torch.nn.ReLU(), torch.nn.Linear(64, s.num_classes))
    cfg = TrainConfig(epochs=3, batch_size=32, lr=1e6, augment="none", channels_last=False, progress=False)
    with pytest.raises(TrainingDivergedError, match=r"epoch 0, step \d+ \(lr=1e\+06.*lower it"):
        fit(m, s.train.x[:256], s.train.y[:256], cfg, seed=0)
