"""DINO's weighted k-NN: every k from one similarity pass, each the vote it should be."""

import pytest
import torch
import torch.nn.functional as F

from adclr.eval_knn import KNN_K, knn_accuracy


def test_knn_reports_every_dino_k_from_one_pass():
    g = torch.Generator().manual_seed(0)
    train_x, test_x = torch.randn(300, 16, generator=g), torch.randn(50, 16, generator=g)
    train_y, test_y = torch.randint(0, 5, (300,), generator=g), torch.randint(0, 5, (50,), generator=g)
    result = knn_accuracy(train_x, train_y, test_x, test_y)
    assert KNN_K == (10, 20, 100, 200) and list(result) == [10, 20, 100, 200]

    def one_k(k):  # each test image on its own: sort, take k, weighted vote
        a, b = train_x / train_x.norm(dim=1, keepdim=True), test_x / test_x.norm(dim=1, keepdim=True)
        hits = 0
        for x, y in zip(b, test_y):
            sims = a @ x
            order = sims.argsort(descending=True)[:k]
            votes = torch.zeros(5).index_add_(0, train_y[order], (sims[order] / 0.07).exp())
            hits += int(votes.argmax() == y)
        return hits / len(test_y)

    assert result == {k: pytest.approx(one_k(k)) for k in KNN_K}
    assert len(set(result.values())) > 1  # the k's are really different votes
    capped = knn_accuracy(train_x[:50], train_y[:50], test_x, test_y, ks=(20, 100))
    assert capped[100] == pytest.approx(knn_accuracy(train_x[:50], train_y[:50], test_x, test_y, ks=(50,))[50])


@pytest.mark.parametrize("temperature", [0.01, 0.001, 1e-6, 1e-300, 5e-324])
def test_knn_votes_at_any_temperature(temperature):
    """Three tight clusters, near one another (cosine ~0.7 between centres): every temperature
    scores them perfectly. exp(sim / T) in float32 overflowed below T ~ 0.011 and tied the
    votes of every class near enough (T = 0.001 scored 1/3 here at k = 60)."""
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(32, generator=g) + 0.7 * torch.randn(3, 32, generator=g)
    labels = torch.arange(3).repeat_interleave(20)
    train_x = centres[labels] + 0.05 * torch.randn(60, 32, generator=g)
    test_x = centres[labels] + 0.05 * torch.randn(60, 32, generator=g)
    assert knn_accuracy(train_x, labels, test_x, labels, ks=(1, 10, 20, 60), temperature=temperature) == {
        1: 1.0, 10: 1.0, 20: 1.0, 60: 1.0}


def test_knn_weights_are_dinos_up_to_a_factor_per_image():
    """The stable votes rank the classes as exp(sim / T) does where that does not overflow:
    a class with many less similar neighbours can outvote one with a single nearer one."""
    train_x = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.6, 0.8], [0.6, 0.8]])
    train_y = torch.tensor([0, 1, 1, 1])
    test_x = torch.tensor([[0.9, 0.43]])  # nearest to class 0, but three class-1 neighbours are close
    for temperature, winner in ((1.0, 1), (0.07, 1), (0.001, 0)):
        sims = F.normalize(test_x, dim=1) @ F.normalize(train_x, dim=1).T
        dino = torch.zeros(2, dtype=torch.float64).index_add_(0, train_y, (sims[0].double() / temperature).exp())
        assert int(dino.argmax()) == winner  # float64 does not overflow here
        assert knn_accuracy(train_x, train_y, test_x, torch.tensor([winner]), ks=(4,), temperature=temperature) == {
            4: 1.0}


def test_a_k_past_the_train_set_is_said(tiny_checkpoint, capsys):
    """A k larger than the train images votes with all of them, and the run says so."""
    from adclr.eval_knn import evaluate_knn

    record = evaluate_knn(tiny_checkpoint, ks=(5, 10, 20), device="cpu", num_workers=0, limit=8)
    assert record["train_images"] == 8 and set(record["accuracy_by_k"]) == {"5", "10", "20"}
    assert record["accuracy_by_k"]["10"] == record["accuracy_by_k"]["20"]  # both vote with all 8
    err = capsys.readouterr().err
    assert "note: k = 10, 20 exceeds the 8 train images: each votes with all of them" in err
    # Progress: at least the end of each split's pass (a line every 10 s before it).
    assert "knn: train features 8/8 images | " in err and "knn: val features 8/8 images | " in err


def test_the_demos_two_networks_score_as_each_alone(tiny_checkpoint, tmp_path, monkeypatch):
    """The demo's last line reads each drawn batch once for both networks: the trained
    network is scored on its own features and the network at init on its own."""
    import shutil

    import adclr.eval_knn
    from adclr.config import Config
    from adclr.features import load_backbone, open_labelled_splits, split_features
    from adclr.train import build

    shutil.copy(tiny_checkpoint, tmp_path / "checkpoint.pt")
    trained, run = load_backbone(str(tmp_path / "checkpoint.pt"))
    cfg = Config(**{**run, "out": str(tmp_path)})
    scored = []
    monkeypatch.setattr(adclr.eval_knn, "knn_accuracy", lambda *features_and_labels: scored.append(
        features_and_labels[:4]) or {20: len(scored) / 10})
    assert adclr.eval_knn.knn_trained_and_at_init(cfg, 40) == (0.1, 0.2)
    for net, (train_f, train_y, val_f, val_y) in zip((trained, build(cfg, "cpu").teacher.backbone.eval()), scored):
        alone = split_features(net, *open_labelled_splits(cfg.data), cfg.data, cfg.image_size, 40, 16, "cpu", 0)
        for joint, own in zip((train_f, train_y, val_f, val_y), alone):
            torch.testing.assert_close(joint, own, rtol=1e-5, atol=1e-5)
