"""DINO's weighted k-NN: every k from one similarity pass, each the vote it should be."""

import pytest
import torch

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
