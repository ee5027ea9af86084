import numpy as np
import pytest
import torch

from minefield.config import ConfigError
from minefield.embed import EmbedConfig, embed_points, weight_matrix
from minefield.plotting.minefield import outlier_mask, plot_minefield
from minefield.runs import RunError
from minefield.search import SearchConfig
from minefield.stages import embed_run, load_embedding, search_run, train_run


def _clusters(n=30, k=3, d=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(k, d, generator=g, dtype=torch.float64) * 10
    x = torch.cat([c + torch.randn(n, d, generator=g, dtype=torch.float64) for c in centres])
    return x, torch.arange(k).repeat_interleave(n)


def _knn_accuracy(z: torch.Tensor, y: torch.Tensor, k: int = 5) -> float:
    d = torch.cdist(z, z)
    d.fill_diagonal_(float("inf"))
    nn_labels = y[d.topk(k, largest=False).indices]
    return float((nn_labels.mode(1).values == y).double().mean())


def test_tsne_keeps_knn_accuracy_of_separated_clusters():
    x, y = _clusters()
    assert _knn_accuracy(x, y) == 1.0  # oracle in the original space
    z = embed_points(x, EmbedConfig(perplexity=10, n_iter=250, pca_dims=10))
    assert z.shape == (90, 2)
    assert _knn_accuracy(z, y) >= 0.95


def test_embedding_is_deterministic_given_the_seed():
    x, _ = _clusters(n=15)
    cfg = EmbedConfig(perplexity=5, n_iter=100)
    a, b = embed_points(x, cfg), embed_points(x, cfg)
    assert torch.equal(a, b)
    assert not torch.allclose(a, embed_points(x, cfg.replace(seed=1)))


def test_weight_matrix_drops_biases_unless_asked():
    p = {"0.weight": torch.ones(2, 3, 4), "0.bias": torch.ones(2, 3)}
    assert weight_matrix(p).shape == (2, 12)
    assert weight_matrix(p, kernels_only=False).shape == (2, 15)
    with pytest.raises(ValueError, match="no weight matrices"):
        weight_matrix({"0.bias": torch.ones(2, 3)})


def test_embed_points_errors():
    with pytest.raises(ValueError, match="need at least 4 points"):
        embed_points(torch.zeros(3, 5))


@pytest.mark.parametrize("kw, msg", [(dict(pca_dims=1), "pca_dims must be >= 2"),
                                     (dict(perplexity=0), "perplexity must be > 0"),
                                     (dict(n_iter=0), "n_iter must be >= 1")])
def test_embed_config_errors(kw, msg):
    with pytest.raises(ConfigError, match=msg):
        EmbedConfig(**kw)


def test_outlier_mask_needs_both_coordinates():
    xy = np.array([[0.0, 0], [1, 0], [0, 1], [-1, 0], [0, -1], [9, 9], [9, 0]])
    assert outlier_mask(xy, 1.5).tolist() == [False] * 5 + [True, False]


def test_embed_run_save_load_and_plot(tmp_path, tiny):
    run = train_run(tiny("good"), tmp_path, progress=False).run
    with pytest.raises(RunError, match="has no bad minima"):
        embed_run(run, device="cpu")
    with pytest.raises(RunError, match="has no embedding"):
        load_embedding(run)
    search_run(run, SearchConfig.make(every=1, steps=30, log_every=10, milestones=()), device="cpu")
    cfg = EmbedConfig(perplexity=2, n_iter=50)
    res = embed_run(run, cfg, device="cpu")
    assert res.kind == ["trajectory"] * 3 + ["bad"] * 3
    assert res.step == [20, 40, 60] * 2
    back = load_embedding(run)
    assert torch.equal(back.coords, res.coords) and back.kind == res.kind
    torch.testing.assert_close(back.test_acc, res.test_acc.double())
    ax = plot_minefield(back, drop_outliers=True)
    assert "final iterate: train" in ax.get_title() and "3 bad minima" in ax.get_title()
    with pytest.raises(ConfigError, match="checkpoints: 'some' is not one of searched, all"):
        embed_run(run, cfg, device="cpu", checkpoints="some")
