"""``espmedsam add-modality``: teach a trained model one more modality, the others left bitwise as they were.

1. ``append_modality``: the model with the new modality's own parameters (controller, query, hypernetwork),
   copied from the closest existing modality or fresh (an identity controller);
2. ``espmedsam train``'s loop with ``train_modalities: [NAME]``: only those parameters learn, on the new
   modality's data, with the recipe's augmentation, validation, checkpoints and resume;
3. the classifier (when the model has one) gains the new class: one more row of its last layer, fitted on
   pooled embeddings of the new images against counter-examples of the existing modalities (their images,
   ``--classifier-data``, and when the checkpoint has feature statistics, samples of the stored Gaussians,
   so their images are not needed); the other rows, so their logits, are unchanged. The new class's
   statistics are fitted on its images.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from espmedsam.checkpoints.native import load_model, save_model
from espmedsam.config import TrainConfig, load_train_config
from espmedsam.data.dataset import DatasetSource, SegmentationFolder, parse_dataset_arg
from espmedsam.errors import ConfigError, InputError
from espmedsam.modality_edits import append_modality, modality_parameter_names, trainable_count
from espmedsam.models.classifier import ModalityClassifier
from espmedsam.models.espmedsam import ESPMedSAM
from espmedsam.train.classifier import ClassifierTraining, extract_features, variants_per_image
from espmedsam.train.classifier_statistics import fit_statistics, sample_hidden
from espmedsam.train.loop import TrainProgress, TrainResult, train

RECIPE = "add_modality"
START_FILE = "start.safetensors"


@dataclass(frozen=True)
class AddedModality:
    """What ``add_modality`` did."""

    checkpoint: Path
    trainable_parameters: int
    result: TrainResult
    classifier_recall: float | None  # of the new class, on the new images' features it was fitted on


def add_modality(
    name: str,
    data: Sequence[str],
    out: Path,
    *,
    init: Path,
    like: str | None = None,
    input_size: int | None = None,
    classifier_data: Sequence[str] = (),
    drop_classifier: bool = False,
    fp16: bool = False,
    config: str | None = None,
    overrides: Sequence[str] = (),
    run_dir: Path | None = None,
    resume: bool = False,
    progress: Callable[[TrainProgress], None] | None = None,
    feature_progress: Callable[[int, int], None] | None = None,
) -> AddedModality:
    """Append modality ``name`` to the model at ``init``, train its own parameters on ``data`` (folders
    ``DIR[:NAME]``; the modality defaults to ``name``) and write the model to ``out``.

    Args:
        like: the existing modality whose parameters the new one starts from (None: fresh).
        input_size: the new modality's model input side (default: ``like``'s, else the model's).
        classifier_data: ``DIR:MODALITY`` folders of the existing modalities, the counter-examples the
            classifier's new class is fitted against (needed when the model has a classifier without
            feature statistics; with them, added to samples of the stored statistics).
        drop_classifier: write the model without its classifier instead (``--modality auto`` then needs
            ``espmedsam classifier train``).
        fp16: store floating tensors as float16 (exact for weights that were float16 already).
        config, overrides: the training recipe (default ``add_modality``) and ``key=value`` changes.
        run_dir: where the run's files go (default ``runs/add_<name>``).
    Raises:
        InputError: an existing or invalid name, an unknown ``like``.
        ConfigError: a layout whose modalities share parameters, data of another modality, or a classifier
            without statistics and without ``classifier_data``.
    """
    sources = [_source(item, name) for item in data]
    negatives = [parse_dataset_arg(item) for item in classifier_data]
    base = load_model(init)
    if drop_classifier:
        base.classifier = None
        without = dataclasses.replace(base.config.classifier, enabled=False)
        base.config = dataclasses.replace(base.config, classifier=without)
    model = append_modality(base, name, like=like, input_size=input_size)  # a bad name is said first
    _check_classifier_data(base, negatives)
    run_dir = Path(run_dir or Path("runs") / f"add_{name}")
    start = run_dir / START_FILE
    if not (resume and start.is_file()):
        save_model(model, start)
    settings = _train_config(name, sources, start, run_dir, model, config, overrides)
    result = train(settings, resume=resume, progress=progress)
    trained = load_model(result.best_path or result.last_path)
    recall = None
    if trained.classifier is not None:
        recall = extend_classifier(trained, name, sources, negatives, progress=feature_progress)
    owned = modality_parameter_names(trained, [name])
    count = trainable_count(trained, owned)
    path = save_model(trained, out, dtype=torch.float16 if fp16 else None)
    return AddedModality(path, count, result, recall)


def _source(item: str, name: str) -> DatasetSource:
    """``DIR`` or ``DIR:NAME``: the folder of the new modality's images.

    Raises:
        InputError: ``DIR:OTHER``, a folder of another modality.
    """
    source = parse_dataset_arg(item, default_modality=name)
    if source.modality != name:
        folder = source.root
        raise InputError(f"--data {item}: the new modality's data must be {folder}:{name} or {folder}")
    return source


def _train_config(
    name: str,
    sources: Sequence[DatasetSource],
    start: Path,
    run_dir: Path,
    model: ESPMedSAM,
    config: str | None,
    overrides: Sequence[str],
) -> TrainConfig:
    return dataclasses.replace(
        load_train_config(config or RECIPE, overrides),
        name=f"add_{name}",
        arch="espmedsam",
        init=str(start),
        data=tuple(f"{s.root}:{name}" for s in sources),
        train_modalities=(name,),
        image_size=model.config.image_size,
        input_sizes=(),
        out_dir=str(run_dir),
    )


def _check_classifier_data(model: ESPMedSAM, negatives: Sequence[DatasetSource]) -> None:
    if model.classifier is None or model.classifier.has_statistics:
        return
    missing = sorted(set(model.modalities) - {s.modality for s in negatives})
    if missing:
        raise ConfigError(
            "the model's modality classifier learns the new class against images of the modalities it "
            f"knows: pass --classifier-data DIR:MODALITY for {', '.join(missing)} (their train splits are "
            "read), give the checkpoint feature statistics first (espmedsam classifier stats), or leave "
            "the classifier out (--drop-classifier)"
        )


def extend_classifier(
    model: ESPMedSAM,
    name: str,
    sources: Sequence[DatasetSource],
    negatives: Sequence[DatasetSource],
    settings: ClassifierTraining | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> float:
    """Fit the classifier's row of the new modality ``name`` (its last modality) in place: pooled
    embeddings of the new images (augmented variants) against counter-examples of the existing
    modalities (the ``negatives``' images, ``samples_per_modality / 2`` per modality), with every other
    weight fixed. With feature statistics, ``samples_per_modality`` draws of each old modality's Gaussian
    join the counter-examples, and the new modality's statistics are fitted on ``samples_per_modality``
    of its own features, as ``classifier stats`` fits the others'. Returns the new class's recall on its
    features.

    Raises:
        ConfigError: no training images of ``name``.
    """
    settings = settings or ClassifierTraining()
    classifier = model.classifier
    if classifier is None:
        raise ConfigError("this checkpoint has no modality classifier to extend")
    folders = [SegmentationFolder(s, "train", cache=True) for s in (*sources, *negatives)]
    counts = {m: sum(len(f) for f in folders if f.modality == m) for m in model.modalities}
    if not counts[name]:
        raise ConfigError(f"no training images of {name!r} for the classifier")
    per_class = settings.samples_per_modality // 2
    variants = variants_per_image(counts, per_class, settings.max_variants)
    if classifier.has_statistics:  # as many of the new class as its statistics' peers were fitted on
        own = variants_per_image({name: counts[name]}, settings.samples_per_modality, settings.max_variants)
        variants[name], per_class = own[name], settings.samples_per_modality
    features = extract_features(
        model, [f for f in folders if len(f)], variants, seed=settings.seed, progress=progress
    )
    new = len(model.modalities) - 1
    classifier.eval()
    with torch.no_grad():
        hidden, labels = classifier.hidden(features.features), features.labels
    if classifier.has_statistics:
        fit_statistics(classifier, features.features, labels, [new])
        generator = torch.Generator().manual_seed(settings.seed)
        drawn, drawn_labels = sample_hidden(classifier, range(new), per_class, generator)
        hidden, labels = torch.cat([hidden, drawn]), torch.cat([labels, drawn_labels])
    row = fit_new_row(classifier, hidden, labels, new, settings)
    with torch.no_grad():
        classifier.fc2.weight[-1], classifier.fc2.bias[-1] = row
        predicted = classifier.head(features.features[features.labels == new]).argmax(1)
    return float((predicted == new).float().mean())


def fit_new_row(
    classifier: ModalityClassifier,
    hidden: torch.Tensor,
    labels: torch.Tensor,
    new: int,
    settings: ClassifierTraining,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The (weight, bias) of class ``new`` that minimise the cross-entropy over all classes on (N, D)
    hidden features (``classifier.hidden``) with (N,) labels, the other classes' rows fixed: a logistic
    problem on the frozen hidden layer's outputs."""
    with torch.no_grad():
        fixed = F.linear(hidden, classifier.fc2.weight[:new], classifier.fc2.bias[:new])
    generator = torch.Generator().manual_seed(settings.seed)
    weight = torch.zeros(hidden.shape[1], requires_grad=True)
    bias = torch.zeros((), requires_grad=True)
    optimiser = torch.optim.AdamW([weight, bias], lr=settings.lr, weight_decay=settings.weight_decay)
    steps = settings.epochs * math.ceil(len(labels) / settings.batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, steps)
    for _ in range(settings.epochs):
        order = torch.randperm(len(labels), generator=generator)
        for start in range(0, len(order), settings.batch_size):
            picked = order[start : start + settings.batch_size]
            logits = torch.cat([fixed[picked], (hidden[picked] @ weight + bias)[:, None]], dim=1)
            loss = F.cross_entropy(logits, labels[picked], label_smoothing=settings.label_smoothing)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            schedule.step()
    return weight.detach(), bias.detach()
