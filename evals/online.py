"""The online evaluation of a pretraining (``--online-eval``): what a run shows while it trains.

At every measurement (every ``every`` optimizer steps and at the last one; by default whole
epochs that hold at least ``COST_FACTOR`` times the monitor's images, so that it costs about
5 % of the training time or less), between two optimizer steps:

1. **Features.** The method's encoder, in eval mode, without gradients and under the run's
   autocast, embeds fixed subsets of the train split (``train_size`` images) and of the test
   split (``test_size``), drawn once with the run's seed, resized to the training size and
   normalised as the evaluation protocols do: the embedding the method trains on (``pooled``:
   a ViT's normed cls token, a CNN's average pool). The encoder's mode is restored after:
   parameters, BatchNorm statistics and random streams are left as they were.
2. ``online_knn_top1``: weighted k-NN (k = 20, T = 0.07, the FAISS code of
   ``eval --protocol knn``) of the test subset against the train subset.
3. ``online_linear_top1``: a linear classifier with its own weights and SGD, never the
   encoder's, kept from one measurement to the next (and in the checkpoint), then its top-1 on
   the test subset. Where the method embeds whole training views (every joint-embedding
   method: ``Method.train_features``) it trains one step on every batch's detached first-view
   features, as solo-learn's online classifier does (``observe``); a masked method's training
   views are mostly hidden, so for MAE and its siblings it trains ``LINEAR_EPOCHS`` passes over
   the train subset at each measurement instead. As MAE's linear probe, the classifier is a
   BatchNorm without affine parameters, then the linear layer.
4. Health (``evals.health``), no labels needed, on the test subset: ``feature_rankme`` of the
   encoder's features; for a method with a training embedding (``Method.embedding``: the
   projector's output, the space its loss compares, where SimSiam without its stop-gradient
   collapses while the backbone's features still look fine) ``rankme`` and ``embedding_std``
   of it (beside ``embedding_std_floor``, 1/sqrt(P)); for a method with two or more views
   ``view_alignment``: two of its own training views of the first ``ALIGNMENT_IMAGES`` test
   images, drawn with a fixed generator. A collapse (``evals.health.collapsed``: the
   embedding's std or rank; without an embedding the features' rank alone, since pooled
   features are not centred and their std says little) is what ``Monitor.collapse`` reports.

Everything is a pure function of the run's seed, the step and the weights, so a resumed run
measures what an uninterrupted one does.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from evals.health import alignment, collapsed, embedding_std, rankme
from evals.knn import knn_evaluate
from mae_bench.config import RunConfig
from mae_bench.data import available_splits, load_dataset
from mae_bench.data.augment import BatchViews, eval_resize
from mae_bench.data.datasets import ArrayDataset
from mae_bench.methods.method import Method
from mae_bench.methods.monitor import Monitor
from mae_bench.models.backbones import is_convnet, pooled
from mae_bench.training.runtime import autocast

TRAIN_SIZE = 2000  # train-subset images (the k-NN bank, the classifier's data)
TEST_SIZE = 1000  # test-subset images
ALIGNMENT_IMAGES = 256  # images whose two training views are compared
COST_FACTOR = 20  # trained images per monitored image, at least (about 5 % of the time)
KNN_K, KNN_T = 20, 0.07
LINEAR_EPOCHS, LINEAR_LR, LINEAR_BATCH = 10, 0.1, 256


def has_labels(cfg: RunConfig) -> bool:
    """Whether the run's data has the labelled train and test splits the monitor needs (for an
    image folder: found on disk). Decodes nothing."""
    return {"train", "test"} <= set(available_splits(cfg.data.dataset, cfg.data.data_dir))


def subset_images(dataset: Any, n: int, seed: int, img_size: int) -> tuple[Tensor, Tensor]:
    """``n`` labelled images (uint8 [n, C, S, S] at ``img_size``) and their labels, drawn once
    from ``dataset`` with ``seed`` without replacement (all of them when it has at most ``n``;
    unlabelled images, label -1, are never drawn from an in-memory data set)."""
    gen = torch.Generator().manual_seed(seed)
    labelled = (torch.nonzero(dataset.labels >= 0).flatten()
                if isinstance(dataset, ArrayDataset) else torch.arange(len(dataset)))
    idx = labelled[torch.randperm(len(labelled), generator=gen)[:n]].sort().values  # [n]
    if isinstance(dataset, ArrayDataset):
        images, labels = dataset.images[idx], dataset.labels[idx]
    else:  # streamed: decode just these
        from torchvision.transforms import InterpolationMode, v2

        dataset.set_transform(v2.Resize((img_size, img_size), InterpolationMode.BICUBIC,
                                        antialias=True))
        items = [dataset[int(i)] for i in idx]
        images = torch.stack([torch.as_tensor(im) for im, _ in items])
        labels = torch.tensor([int(lab) for _, lab in items])
    return images, labels.long()


class OnlineMonitor(Monitor):
    """The online evaluation of one run; see the module docstring.

    Args:
        cfg: the run's config (its data set and seed).
        every: optimizer steps between measurements; None: whole epochs, set by ``start``.
        train_size, test_size: subset sizes (capped at the splits' sizes).

    The splits are read in ``start``, once the run's checks have passed (reading an image
    folder writes its decoded cache).
    """

    def __init__(self, cfg: RunConfig, every: int | None = None,
                 train_size: int = TRAIN_SIZE, test_size: int = TEST_SIZE) -> None:
        self.data = cfg.data
        self.sizes, self.seed = (train_size, test_size), cfg.train.seed
        self.fixed_every = every
        if every is not None:
            self.every = every
        self.classifier: nn.Sequential | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.per_batch = False  # the classifier trains on every batch (``observe``)
        self._pending_state: dict[str, Any] | None = None

    def start(self, *, device: torch.device, precision: str, img_size: int,
              steps_per_epoch: int, images_per_epoch: int) -> None:
        self.img_size, self.device, self.precision = img_size, device, precision
        data, (n_train, n_test) = self.data, self.sizes
        train, test = (load_dataset(data.dataset, split, data.data_dir)
                       for split in ("train", "test"))
        self.mean = torch.tensor(train.info.mean, device=device).view(1, -1, 1, 1)
        self.std = torch.tensor(train.info.std, device=device).view(1, -1, 1, 1)
        self.train_x, self.train_y = subset_images(train, n_train, self.seed, img_size)
        self.test_x, self.test_y = subset_images(test, n_test, self.seed + 1, img_size)
        self.num_classes = int(max(self.train_y.max(), self.test_y.max())) + 1
        if self.fixed_every is None:
            epochs = max(1, math.ceil(COST_FACTOR * self.images_per_measurement
                                      / max(1, images_per_epoch)))
            self.every = epochs * steps_per_epoch

    @property
    def images_per_measurement(self) -> int:
        return len(self.train_x) + len(self.test_x) + 2 * min(ALIGNMENT_IMAGES, len(self.test_x))

    # --- measuring ---------------------------------------------------------------------------

    @torch.no_grad()
    def embed(self, encoder: nn.Module, images: Tensor, normalised: bool = False) -> Tensor:
        """[n, D] float32 CPU embeddings of uint8 (or, ``normalised``, float) images."""
        out = []
        for lo in range(0, images.shape[0], 256):
            x = images[lo:lo + 256].to(self.device)
            if not normalised:
                x = eval_resize(x, self.img_size)  # [B, C, S, S] 0..255
                x = (x / 255.0 - self.mean) / self.std
            if is_convnet(encoder):
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast(self.device, self.precision):
                out.append(pooled(encoder, x).float().cpu())  # [B, D]
        return torch.cat(out)

    def measure(self, method: Method, step: int) -> dict[str, float]:
        encoder = method.encoder
        modes = {m: m.training for m in method.modules()}
        method.eval()  # BatchNorm on its running statistics, which then stay as they are
        try:
            train_f = self.embed(encoder, self.train_x)  # [n, D]
            test_f = self.embed(encoder, self.test_x)  # [m, D]
            with torch.no_grad(), autocast(self.device, self.precision):
                z = method.embedding(test_f.to(self.device))  # [m, P] or None
            aligned = self.view_alignment(method, encoder)
        finally:
            for m, mode in modes.items():
                m.training = mode
        if not (torch.isfinite(train_f).all() and torch.isfinite(test_f).all()):
            # non-finite weights: the loop's next log line stops the run on its loss
            return {"online_knn_top1": math.nan, "online_linear_top1": math.nan}
        knn = knn_evaluate(train_f, self.train_y, test_f, self.test_y, ks=(KNN_K,),
                           temperature=KNN_T, num_classes=self.num_classes, retrieval=False)
        values = {"online_knn_top1": knn.accuracy[KNN_K]["top1"],
                  "online_linear_top1": self.linear(train_f, test_f, step),
                  "feature_rankme": rankme(test_f)}
        if z is not None:  # the method's training embedding: where it collapses
            z = z.float().cpu()
            values |= {"rankme": rankme(z), "embedding_std": embedding_std(z),
                       "embedding_std_floor": 1 / math.sqrt(z.shape[1])}
        if aligned is not None:
            values["view_alignment"] = aligned
        return values

    def view_alignment(self, method: Method, encoder: nn.Module) -> float | None:
        """``alignment`` of the embeddings of the method's first two training views of the
        first test images, drawn with a generator of the run's seed (fixed across
        measurements); None for a one-view method."""
        specs = method.view_specs()
        if len(specs) < 2:
            return None
        images = self.test_x[:ALIGNMENT_IMAGES].to(self.device)
        gen = torch.Generator(device=self.device).manual_seed(self.seed + 7)
        mean, std = tuple(self.mean.flatten().tolist()), tuple(self.std.flatten().tolist())
        views = [BatchViews(spec, mean, std)(images, gen) for spec in specs[:2]]
        first, second = (self.embed(encoder, v, normalised=True) for v in views)
        return alignment(first, second)

    def observe(self, method: Method, labels: Tensor) -> None:
        """solo-learn's online classifier: one step on the detached features of the batch's
        first training view (``method.train_features``), where the method computed them."""
        features, method.train_features = method.train_features, None
        if features is None:
            return
        keep = labels >= 0
        if not keep.any():
            return
        x = features.float()[keep.to(features.device)]  # [n, D]
        y = labels[keep].to(x.device)
        if len(y) < 2:  # batch statistics need two
            return
        if self.classifier is None:
            self._build(x.shape[1])
        self.per_batch = True
        self.classifier.train()
        with torch.enable_grad():
            loss = F.cross_entropy(self.classifier(x), y)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
        self.optimizer.step()

    def linear(self, train_f: Tensor, test_f: Tensor, step: int) -> float:
        """The online classifier's top-1 (%) on the test subset. Where it trains on every
        batch (``observe``) it is only evaluated here; otherwise (a method that never embeds a
        whole view: MAE and its masked siblings) it first trains ``LINEAR_EPOCHS`` passes on
        the train subset."""
        xte = test_f.to(self.device)
        if self.classifier is None:  # (a resumed run's, before its first batch)
            self._build(xte.shape[1])
        if not self.per_batch:
            self._train_on_subset(train_f.to(self.device), step)
        self.classifier.eval()  # its BatchNorm on the running statistics
        with torch.no_grad():
            pred = self.classifier(xte).argmax(1).cpu()
        return float((pred == self.test_y).double().mean() * 100)

    def _train_on_subset(self, xtr: Tensor, step: int) -> None:
        ytr = self.train_y.to(self.device)
        clf, opt = self.classifier, self.optimizer
        clf.train()
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        for _ in range(LINEAR_EPOCHS):
            for idx in torch.randperm(len(xtr), generator=gen).split(LINEAR_BATCH):
                if len(idx) < 2:  # batch statistics need two
                    continue
                idx = idx.to(self.device)
                with torch.enable_grad():
                    loss = F.cross_entropy(clf(xtr[idx]), ytr[idx])
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                opt.step()

    def _build(self, dim: int) -> None:
        gen_state = torch.random.get_rng_state()  # the run's stream stays where it was
        torch.manual_seed(self.seed + 11)
        # MAE's linear probe: BatchNorm without affine (it standardises the features, whose
        # scale and shared offset differ from encoder to encoder), then the linear layer
        self.classifier = nn.Sequential(nn.BatchNorm1d(dim, affine=False, eps=1e-6),
                                        nn.Linear(dim, self.num_classes)).to(self.device)
        torch.random.set_rng_state(gen_state)
        # solo-learn's online classifier: SGD, lr 0.1, momentum 0.9, no weight decay
        self.optimizer = torch.optim.SGD(self.classifier.parameters(), lr=LINEAR_LR,
                                         momentum=0.9)
        if self._pending_state is not None:
            self.classifier.load_state_dict(self._pending_state["classifier"])
            self.optimizer.load_state_dict(self._pending_state["optimizer"])
            self._pending_state = None

    def collapse(self, values: dict[str, float]) -> str | None:
        if "feature_rankme" not in values:  # nothing measured (non-finite features)
            return None
        if "embedding_std" not in values:  # no training embedding: the features' rank alone
            return collapsed(math.inf, values["feature_rankme"], 1)
        dim = round(1 / values["embedding_std_floor"] ** 2)
        return collapsed(values["embedding_std"], values["rankme"], dim)

    # --- checkpoint --------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        if self.classifier is None:
            return self._pending_state or {}
        return {"classifier": self.classifier.state_dict(),
                "optimizer": self.optimizer.state_dict(), "per_batch": self.per_batch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            self._pending_state = state  # applied when the classifier is built (its width)
            self.per_batch = bool(state.get("per_batch", False))
