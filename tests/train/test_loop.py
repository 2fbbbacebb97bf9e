import torch

from bdseal.data import load_dataset
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
    assert torch.load(ck, weights_only=False)["epoch"] == 1
    _, m_b, _ = _small_run()
    fit(m_b, s.train.x, s.train.y, cfg, seed=3, checkpoint=ck, resume=True)
    for a, b in zip(m_full.parameters(), m_b.parameters()):
        assert torch.equal(a, b)


def test_schedules():
    cos = lr_multiplier("cosine", 100, 10)
    assert cos(0) == 1.0 and abs(cos(100)) < 1e-9
    step = lr_multiplier("step", 100, 10, milestones=[5, 8], gamma=0.1)
    assert step(49) == 1.0 and abs(step(50) - 0.1) < 1e-12 and abs(step(80) - 0.01) < 1e-12
