"""`adclr eval knn`: DINO's weighted k-NN on frozen CLS features (its eval_knn.py).

Every val image's CLS feature votes among the k most cosine-similar train features,
each weighing exp(similarity / T). The headline number is DINO's, k = 20.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.nn.functional as F

from .data import default_num_workers
from .features import backbone_for_eval, load_backbone, open_labelled_splits, run_data, split_features
from .train import build

KNN_K = (10, 20, 100, 200)  # DINO's eval_knn.py --nb_knn


def knn_accuracy(train_features, train_labels, test_features, test_labels, ks=KNN_K, temperature=0.07):
    """DINO's weighted k-NN: the k most cosine-similar train features vote with exp(sim / T),
    computed so that no temperature overflows it.

    One similarity pass for every k in `ks` (the k nearest are a prefix of the max-k
    nearest). Returns {k: accuracy}; a k beyond the train set's size uses all of it.
    """
    train_features = F.normalize(train_features, dim=1)
    test_features = F.normalize(test_features, dim=1)
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    correct = dict.fromkeys(ks, 0)
    for start in range(0, len(test_features), 1024):  # bounded memory for large banks
        sims, idx = (test_features[start:start + 1024] @ train_features.T).topk(
            min(max(ks), len(train_features)), dim=1)
        # exp(sim / T) overflows float32 for T below ~0.011 and ties every vote. A row's votes
        # may all be scaled by one factor: exp((sim - the row's largest sim) / T) is at most 1,
        # and in float64 T may be as small as a float allows.
        weights = ((sims - sims[:, :1]).double() / temperature).exp()
        neighbours = train_labels[idx]
        for k in correct:
            votes = torch.zeros(len(idx), num_classes, dtype=torch.float64).scatter_add_(
                1, neighbours[:, :k], weights[:, :k])
            correct[k] += (votes.argmax(1) == test_labels[start:start + 1024]).sum().item()
    return {k: c / len(test_features) for k, c in correct.items()}


def evaluate_knn(checkpoint, data=None, weights="teacher", image_size=None, batch_size=128, ks=KNN_K,
                 temperature=0.07, device="auto", num_workers=-1, limit=0):
    """`adclr eval knn`: the JSON record; "accuracy" is k = 20's (else the first k's),
    "accuracy_by_k" every k's."""
    backbone, cfg, device, size = backbone_for_eval(checkpoint, weights, device, image_size)
    data, flag = run_data(data, cfg)
    train_images, val_images = open_labelled_splits(data, flag=flag)
    workers = default_num_workers() if num_workers < 0 else num_workers
    train_f, train_y, val_f, val_y = split_features(backbone, train_images, val_images, data, size, limit,
                                                    batch_size, device, workers, what="knn", flag=flag)
    by_k = knn_accuracy(train_f, train_y, val_f, val_y, ks, temperature)
    beyond = [k for k in ks if k > len(train_y)]
    if beyond:
        print(f"note: k = {', '.join(map(str, beyond))} exceeds the {len(train_y)} train images: "
              f"{'each votes' if len(beyond) > 1 else 'it votes'} with all of them", file=sys.stderr)
    headline = 20 if 20 in by_k else next(iter(by_k))  # DINO's headline k-NN number is k=20
    return {"protocol": "knn", "checkpoint": checkpoint, "weights": weights, "data": data,
            "train_images": len(train_y), "val_images": len(val_y), "accuracy": by_k[headline], "k": headline,
            "accuracy_by_k": {str(k): v for k, v in by_k.items()}, "temperature": temperature}


# The demo's last line scores this many images per split: about 5 s of CPU for both
# networks together, the demo's vit_mini at 64 px.
DEMO_IMAGES = 1000


def knn_trained_and_at_init(cfg, images):
    """(k-NN accuracy (k = 20) of the run's teacher, and of the same network as the run
    started it) on `images` images per split of the run's data, on the CPU."""
    train_images, val_images = open_labelled_splits(cfg.data)
    trained = load_backbone(os.path.join(cfg.out, "checkpoint.pt"))[0]
    at_init = build(cfg, "cpu").teacher.backbone.eval()
    # Both networks read each batch as it is drawn: drawing the built-in images costs
    # about as much as the two small networks' forwards together.
    both = lambda batch: torch.cat([net.forward_features(batch)["cls"] for net in (trained, at_init)], 1)
    train_f, train_y, val_f, val_y = split_features(trained, train_images, val_images, cfg.data, cfg.image_size,
                                                    images, 128, "cpu", 0, encode=both)
    halves = [slice(0, trained.embed_dim), slice(trained.embed_dim, None)]
    return tuple(knn_accuracy(train_f[:, half], train_y, val_f[:, half], val_y, (20,))[20] for half in halves)
