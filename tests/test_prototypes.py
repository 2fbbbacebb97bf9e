import torch

from bdseal.prototypes import class_means, kmeans, kmeans_prototypes, momentum_update


def test_class_means_and_normalisation():
    f = torch.tensor([[1.0, 0.0], [3.0, 0.0], [0.0, 2.0]])
    y = torch.tensor([0, 0, 1])
    assert torch.equal(class_means(f, y, 2), torch.tensor([[2.0, 0.0], [0.0, 2.0]]))
    assert torch.allclose(class_means(f, y, 2, normalize=True).norm(dim=1), torch.ones(2))


def test_kmeans_finds_planted_centres_and_prototype_is_their_mean():
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    pts = torch.cat([c + 0.1 * torch.randn(50, 2, generator=g) for c in centres])
    found = kmeans(pts, 3)
    d = torch.cdist(found, centres).min(dim=1).values
    assert (d < 0.2).all()
    labels = torch.zeros(150, dtype=torch.long)
    cents, protos = kmeans_prototypes(pts, labels, 1, k=3)
    assert cents.shape == (1, 3, 2) and torch.allclose(protos[0], cents[0].mean(0))


def test_momentum_update_weights_new():
    assert torch.equal(momentum_update(torch.zeros(2), torch.ones(2), 0.75), torch.full((2,), 0.75))
