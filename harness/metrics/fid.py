"""FID, KID and CMMD as torchmetrics ``Metric`` subclasses that share one feature pass.

``update(images, real=True|False)`` extracts features (through the one resize path in
:mod:`harness.metrics.images`); ``update_features(features, real=...)`` takes features already
extracted, so one pass over a folder serves FID, KID, CMMD and PRDC (see ``score.score_sets``).

Memory, the trade-off:
* FID keeps running sums (sum x, sum x x^T in float64, count): flat in the number of images. For its
  bootstrap interval it also keeps a reservoir of at most ``ci_samples`` features per side (float16
  on the CPU; 0 turns it off). Beyond the reservoir the interval is an approximation (flagged).
* KID, CMMD and PRDC need the features themselves: they keep up to ``max_samples`` per side
  (float32 on the CPU by default, ``feature_dtype=torch.float16`` halves it); beyond that a uniform
  reservoir sample is kept and a warning says so.
States are registered with ``dist_reduce_fx`` (sum / cat), so they sync across processes.

Each metric owns its extractor default (``default_extractor``: the model its reference uses) and the
way its reference prepares images and features for each extractor kind (``extractor_options``: crop,
resize, L2 normalisation; see :mod:`harness.metrics.extractors`). ``reference`` names what it follows.
A user ``nn.Module`` is used as given.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from torchmetrics import Metric

from harness.errors import HarnessError
from harness.metrics import frechet
from harness.metrics.base import canonical_order, cat_state, record
from harness.metrics.bootstrap import bootstrap_ci
from harness.metrics.features import Extractor, get_extractor

# clean-fid's CLIP features (clip_features.img_preprocess_clip): Resize(S) + CenterCrop(S), raw embeddings
CLEANFID_CLIP = {"normalize": False, "crop": "resize-crop"}
# dgm-eval's DINOv2 encoder: Resize((224, 224)) bicubic, no crop, raw CLS features
DGM_EVAL_DINOV2 = {"normalize": False, "crop": "none", "input_size": 224}
RAW = {"clip": CLEANFID_CLIP, "dinov2": DGM_EVAL_DINOV2, "inception": {"normalize": False, "crop": "none"}}

log = logging.getLogger(__name__)

SIDES = ("real", "fake")


class FeatureSetMetric(Metric):
    """Base: a set-vs-set metric on features of 'real' (reference, set A) and 'fake' (set B) images."""

    is_differentiable = False
    higher_is_better = False
    full_state_update = False
    default_extractor = "inception"
    extractor_options: dict[str, dict] = RAW  # by extractor kind
    reference = ""
    keeps_features = True
    lower_bound: float | None = None  # the statistic's floor, where it has one (FID: 0); clips intervals

    def __init__(self, extractor=None, *, crop: str | None = None, resize: str | None = None,
                 input_size: int | None = None, num_features: int | None = None, max_samples: int = 50_000,
                 feature_dtype: torch.dtype = torch.float32, seed: int = 0, **kwargs):
        super().__init__(**kwargs)
        if extractor is None and num_features is None:
            extractor = self.default_extractor
        # A plain attribute, not a submodule: the extractor is not part of the metric's state.
        self.__dict__["extractor"] = None if extractor is None else self.prepare_extractor(
            extractor, crop=crop, resize=resize, input_size=input_size)
        self.num_features = int(num_features or self.extractor.dim)
        self.max_samples, self.feature_dtype, self.seed = int(max_samples), feature_dtype, int(seed)
        self._rng = np.random.default_rng(seed)
        self._warned_cap = False
        for side in SIDES:
            self.add_state(f"{side}_n", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
            if self.keeps_features:
                self.add_state(f"{side}_feats", default=[], dist_reduce_fx="cat")

    @classmethod
    def prepare_extractor(cls, extractor, device="cpu", **overrides) -> Extractor:
        """``extractor`` (a spec, Extractor or nn.Module) as this metric's reference feeds it, with the
        suite's ``crop`` / ``resize`` / ``input_size`` settings over that."""
        ext = get_extractor(extractor, device=device)
        options = {} if ext.kind == "module" else dict(cls.extractor_options.get(ext.kind, {}))
        options.update({k: v for k, v in overrides.items() if v is not None})
        return ext.variant(**options)

    @property
    def identity(self) -> str:
        return self.extractor.identity if isinstance(self.extractor, Extractor) else "precomputed"

    def update(self, images, real: bool) -> None:  # type: ignore[override]
        if self.extractor is None:
            raise HarnessError(f"{type(self).__name__}: built without an extractor; use update_features()")
        self.update_features(self.extractor.batch(images), real=real)

    def update_features(self, features, real: bool) -> None:
        f = torch.as_tensor(np.asarray(features) if not isinstance(features, torch.Tensor) else features)
        if f.ndim != 2 or f.shape[1] != self.num_features:
            raise HarnessError(f"{type(self).__name__}: features must be [N, {self.num_features}], "
                               f"got {tuple(f.shape)}")
        side = "real" if real else "fake"
        self._accumulate(side, f.detach())
        setattr(self, f"{side}_n", getattr(self, f"{side}_n") + len(f))
        self._update_count += 1

    def _accumulate(self, side: str, f: torch.Tensor) -> None:
        # update_features is a second entry point torchmetrics does not wrap: drop the cached result.
        self._computed = None
        if self.keeps_features:
            self._store(side, f, self.max_samples, f"{side}_feats", self.feature_dtype)

    def _store(self, side, f, cap, name, dtype) -> None:
        """Append to a feature buffer; past ``cap`` rows keep a uniform reservoir sample."""
        buf = getattr(self, name)
        f = f.to("cpu", dtype)
        stored = sum(len(t) for t in buf)
        room = max(cap - stored, 0)
        if room:
            buf.append(f[:room])
            f = f[room:]
        if len(f) == 0:
            return
        if len(buf) > 1:
            buf[:] = [torch.cat(buf)]
        seen = int(getattr(self, f"{side}_n")) + room
        if not self._warned_cap and name.endswith("_feats"):
            log.warning("%s: more than %d images per side; keeping a uniform random sample of %d features "
                        "(raise max_samples for exact values)", type(self).__name__, cap, cap)
            self._warned_cap = True
        for i in range(len(f)):  # reservoir sampling (algorithm R)
            j = int(self._rng.integers(0, seen + i + 1))
            if j < cap:
                buf[0][j] = f[i]

    def features(self, side: str, name: str | None = None) -> np.ndarray:
        """The kept features of one side, float64, in canonical order."""
        x = cat_state(getattr(self, name or f"{side}_feats"), self.num_features).double().cpu().numpy()
        return x[canonical_order(x)]

    def counts(self) -> tuple[int, int]:
        return int(self.real_n), int(self.fake_n)

    def _check_counts(self, need: int = 2) -> None:
        n_a, n_b = self.counts()
        if min(n_a, n_b) < need:
            raise HarnessError(f"{type(self).__name__}: needs at least {need} images per set, got "
                               f"{n_a} (A, reference) and {n_b} (B)")

    def statistic(self, real: np.ndarray, fake: np.ndarray) -> float:
        raise NotImplementedError

    def compute(self):
        self._check_counts()
        return torch.tensor(self.statistic(self.features("real"), self.features("fake")), dtype=torch.float64)

    def _warnings(self) -> list[str]:
        n_a, n_b = self.counts()
        if self.keeps_features and max(n_a, n_b) > self.max_samples:
            return [f"values use a random sample of {self.max_samples} of the {max(n_a, n_b)} images per side"]
        return []

    def compute_ci(self, n_boot: int = 100, alpha: float = 0.05, seed: int = 0) -> dict:
        """Value, percentile-bootstrap interval (both sets resampled), counts and provenance."""
        with self.sync_context():
            self._check_counts()
            real, fake = self.features("real"), self.features("fake")
            value = float(self.statistic(real, fake))
            ci = bootstrap_ci(self.statistic, [real, fake], n_boot=n_boot, alpha=alpha, seed=seed,
                              lower=self.lower_bound, estimate=value)
            n_a, n_b = self.counts()
            return record(self.metric_name, value, n_a=n_a, n_b=n_b, ci=ci, warnings=self._warnings(),
                          extra=self._describe())

    def _describe(self) -> dict:
        d = self.extractor.describe() if isinstance(self.extractor, Extractor) else {"extractor": self.identity}
        return {**d, "reference": self.reference, "max_samples": self.max_samples,
                "feature_dtype": str(self.feature_dtype)}

    @property
    def metric_name(self) -> str:
        return type(self).__name__.lower()


class FID(FeatureSetMetric):
    """Fréchet distance between Gaussians fitted to the two sets' features (running float64 sums)."""

    keeps_features = False
    lower_bound = 0.0
    reference = ("pytorch-fid / clean-fid / torchmetrics FID: Inception-v3 pool3 (torch-fidelity's 2015-12-05 "
                 "weights); resize 'clean' = PIL bicubic on uint8 to 299 (clean-fid resizes float channels, "
                 "so not bit-exact) or 'legacy-torchmetrics' = torch-fidelity's TF1 bilinear (torchmetrics)")

    def __init__(self, extractor=None, *, ci_samples: int = 5000, **kwargs):
        super().__init__(extractor, **kwargs)
        d = self.num_features
        self.ci_samples = int(ci_samples)
        for side in SIDES:
            self.add_state(f"{side}_sum", torch.zeros(d, dtype=torch.float64), dist_reduce_fx="sum")
            self.add_state(f"{side}_outer", torch.zeros(d, d, dtype=torch.float64), dist_reduce_fx="sum")
            if self.ci_samples:
                self.add_state(f"{side}_ci", default=[], dist_reduce_fx="cat")

    def _accumulate(self, side, f):
        self._computed = None
        f64 = f.to(self.device, torch.float64)
        setattr(self, f"{side}_sum", getattr(self, f"{side}_sum") + f64.sum(0))
        setattr(self, f"{side}_outer", getattr(self, f"{side}_outer") + f64.T @ f64)
        if self.ci_samples:
            self._store(side, f, self.ci_samples, f"{side}_ci", torch.float16)

    def load_reference(self, path) -> None:
        """Use cached reference statistics (a features .npz of the same extractor) as the real side."""
        from harness.metrics.features import load_features

        z = load_features(path, self.identity)
        n, mu, cov = int(z["count"]), z["mean"].astype(np.float64), z["cov"].astype(np.float64)
        self.real_sum = torch.as_tensor(mu * n, device=self.device)
        self.real_outer = torch.as_tensor(cov * (n - 1) + n * np.outer(mu, mu), device=self.device)
        self.real_n = torch.tensor(n, device=self.device)
        if self.ci_samples and "features" in z:
            self.real_ci = [torch.as_tensor(z["features"][: self.ci_samples]).to(torch.float16)]
        self._computed = None

    def stats(self, side: str) -> tuple[np.ndarray, np.ndarray]:
        return frechet.mean_cov_from_sums(getattr(self, f"{side}_sum").cpu().numpy(),
                                          getattr(self, f"{side}_outer").cpu().numpy(),
                                          int(getattr(self, f"{side}_n")))

    def statistic(self, real, fake):
        return frechet.frechet_distance_features(real, fake)

    def _warnings(self) -> list[str]:
        n_a, n_b = self.counts()
        d = self.num_features
        if min(n_a, n_b) < d:
            return [f"FID from {min(n_a, n_b)} images with {d}-dimensional features: the covariance is "
                    f"rank-deficient and FID is biased upward; use >= {d} images per set, or KID"]
        return []

    def compute(self):
        self._check_counts()
        for w in self._warnings():
            log.warning(w)
        (mu1, s1), (mu2, s2) = self.stats("real"), self.stats("fake")
        return torch.tensor(frechet.frechet_distance(mu1, s1, mu2, s2), dtype=torch.float64)

    def compute_ci(self, n_boot: int = 50, alpha: float = 0.05, seed: int = 0) -> dict:
        with self.sync_context():
            self._check_counts()
            (mu1, s1), (mu2, s2) = self.stats("real"), self.stats("fake")
            value = frechet.frechet_distance(mu1, s1, mu2, s2)
            n_a, n_b = self.counts()
            warnings = self._warnings()
            ci: dict = {}
            if self.ci_samples:
                real, fake = self.features("real", "real_ci"), self.features("fake", "fake_ci")
                ci = bootstrap_ci(self.statistic, [real, fake], n_boot=n_boot, alpha=alpha, seed=seed, lower=0.0)
                m_a, m_b = len(real), len(fake)
                if (m_a, m_b) != (n_a, n_b) and ci["ci_low"] is not None:
                    # Reservoir smaller than the set: centre on the full value, shrink the spread as 1/sqrt(n).
                    base, scale = self.statistic(real, fake), np.sqrt(min(m_a, m_b) / min(n_a, n_b))
                    ci["ci_low"] = max(value + (ci["ci_low"] - base) * scale, 0.0)
                    ci["ci_high"] = value + (ci["ci_high"] - base) * scale
                    ci["ci_method"] = f"bootstrap of a {min(m_a, m_b)}-image reservoir, spread scaled by sqrt(m/n)"
                    warnings.append("FID interval approximated from a reservoir (raise ci_samples for an exact one)")
            else:
                warnings.append("no interval: FID was built with ci_samples=0")
            return record(self.metric_name, value, n_a=n_a, n_b=n_b, ci=ci, warnings=warnings,
                          extra={**self._describe(), "ci_samples": self.ci_samples})

    @property
    def metric_name(self) -> str:
        return "fid"


class KID(FeatureSetMetric):
    """Kernel Inception Distance: unbiased polynomial-kernel MMD^2, mean and std over random subsets.

    A ``subset_size`` above the smaller set's N is not refused (eval suites are often small): subsets of N
    are used with a warning, and the std comes from the bootstrap, since subsets that hold a whole set
    are all alike (their std would read 0). torchmetrics and torch-fidelity refuse such a size."""

    reference = ("Binkowski et al. 2018 / torchmetrics / torch-fidelity KID: Inception pool3, kernel "
                 "(x.y/d + 1)^3, 100 subsets of 1000; papers print KID x 10^3")

    def __init__(self, extractor=None, *, subsets: int = 100, subset_size: int = 1000, degree: int = 3,
                 coef: float = 1.0, **kwargs):
        super().__init__(extractor, **kwargs)
        self.subsets, self.subset_size, self.degree, self.coef = subsets, subset_size, degree, coef

    def statistic(self, real, fake, subsets: int | None = None):
        return self._kid(real, fake, subsets)[0]

    def _kid(self, real, fake, subsets: int | None = None) -> tuple[float, float]:
        return frechet.kid(real, fake, subsets=subsets or self.subsets, subset_size=self.subset_size,
                           degree=self.degree, coef=self.coef, seed=self.seed)

    def _whole_sets(self) -> bool:
        """Whether every subset would hold all of the smaller set (its subset std then means nothing)."""
        return self.subset_size >= min(self.counts())

    def _warnings(self) -> list[str]:
        out = super()._warnings()
        if self._whole_sets():
            n = min(self.counts())
            out.append(f"KID subset_size {self.subset_size} >= the {n} images of the smaller set: subsets of {n} "
                       "(the whole set) are used and the std is the bootstrap's; torchmetrics would refuse this size")
        return out

    def _boot(self, real, fake, n_boot: int, alpha: float, seed: int, estimate: float) -> dict:
        # Fewer subsets per replicate: the bootstrap already averages over resamples.
        return bootstrap_ci(lambda a, b: self.statistic(a, b, subsets=10), [real, fake], n_boot=n_boot,
                            alpha=alpha, seed=seed, estimate=estimate)

    def compute(self):
        """(mean, std) over subsets, like torchmetrics' KernelInceptionDistance (see the class docstring)."""
        self._check_counts()
        real, fake = self.features("real"), self.features("fake")
        m, s = self._kid(real, fake)
        if self._whole_sets():
            s = self._boot(real, fake, 50, 0.05, self.seed, m)["boot_std"]
        return torch.tensor(m, dtype=torch.float64), torch.tensor(s, dtype=torch.float64)

    def compute_ci(self, n_boot: int = 100, alpha: float = 0.05, seed: int = 0) -> dict:
        with self.sync_context():
            self._check_counts()
            real, fake = self.features("real"), self.features("fake")
            m, s = self._kid(real, fake)
            ci = self._boot(real, fake, n_boot, alpha, seed, m)
            whole = self._whole_sets()
            n_a, n_b = self.counts()
            return record("kid", m, n_a=n_a, n_b=n_b, ci=ci, warnings=self._warnings(),
                          extra={**self._describe(), "kid_std": ci["boot_std"] if whole else s,
                                 "kid_std_method": "bootstrap" if whole else "subsets", "subsets": self.subsets,
                                 "subset_size": min(self.subset_size, len(real), len(fake))})


class CMMD(FeatureSetMetric):
    """CMMD: Gaussian-RBF MMD on L2-normalised CLIP ViT-L/14@336 image embeddings, x1000 (Jayasumana et
    al. 2024). Its value falls with N (same distribution: ~0.16 at 100 images, ~0.015 at 1,000): compare
    rows at equal N only."""

    default_extractor = "clip:ViT-L-14-336:openai"
    # google-research cmmd: io_util centre-crops then resizes (PIL bicubic), embedding.py normalises
    extractor_options = {"clip": {"normalize": True, "crop": "crop-resize"},
                         "dinov2": {"normalize": True, "crop": "none", "input_size": 224},
                         "inception": {"normalize": True, "crop": "none"}}
    reference = ("google-research/cmmd: CLIP ViT-L/14@336 image_embeds, L2-normalised, centre crop then PIL "
                 "bicubic resize, RBF sigma 10, x1000 (V-statistic)")

    def __init__(self, extractor=None, *, sigma: float = 10.0, scale: float = 1000.0, **kwargs):
        super().__init__(extractor, **kwargs)
        self.sigma, self.scale = sigma, scale

    def statistic(self, real, fake):
        return frechet.cmmd(real, fake, sigma=self.sigma, scale=self.scale)


class FIDClip(FID):
    """FID on CLIP ViT-B/32 image embeddings the way clean-fid's ``model_name="clip_vit_b_32"`` computes
    it: raw (not normalised) ``encode_image`` outputs of the image resized (shorter side, bicubic) and
    centre-cropped to the model's input size."""

    default_extractor = "clip:ViT-B-32:openai"
    reference = ("clean-fid compute_fid(model_name='clip_vit_b_32'): raw ViT-B/32 embeddings, "
                 "Resize(224, bicubic) + CenterCrop(224)")

    @property
    def metric_name(self) -> str:
        return "fid_clip"


class FIDClipL2(FIDClip):
    """FID on L2-normalised CLIP embeddings (what this harness's ``fid_clip`` was before it followed
    clean-fid). Unit vectors bound it near 4; not comparable with clean-fid's CLIP FID."""

    extractor_options = {**RAW, "clip": {**CLEANFID_CLIP, "normalize": True}}
    reference = "none (harness): clean-fid's CLIP preprocessing, features L2-normalised; values are at most ~4"

    @property
    def metric_name(self) -> str:
        return "fid_clip_l2"


class FIDDinov2(FID):
    """FID on DINOv2 ViT-L/14 CLS features as dgm-eval computes it (Stein et al. 2023): 224 px, bicubic
    resize to the square (no crop), raw features."""

    default_extractor = "dinov2:facebook/dinov2-large"
    reference = "dgm-eval (Stein et al. 2023) FD_DINOv2: dinov2_vitl14 CLS, Resize((224, 224), bicubic)"

    @property
    def metric_name(self) -> str:
        return "fid_dinov2"
