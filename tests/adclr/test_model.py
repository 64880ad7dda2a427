from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import adclr.model
from adclr.model import ADCLRModel, DINOHead, VisionTransformer, build_backbone, drop_path


def tiny_backbone(backend="sdpa", **options):
    torch.manual_seed(0)
    return build_backbone("vit_test", img_size=32, patch_size=8, attention=backend, **options).eval()


def test_parameter_names_follow_timm():
    names = set(tiny_backbone().state_dict())
    expected = {"cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias",
                "norm.weight", "norm.bias"}
    for i in range(2):
        for part in ("norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias",
                     "attn.proj.weight", "attn.proj.bias", "norm2.weight", "norm2.bias",
                     "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias"):
            expected.add(f"blocks.{i}.{part}")
    assert names == expected
    assert tiny_backbone().state_dict()["pos_embed"].shape == (1, 1 + 16, 64)


@pytest.mark.parametrize("backend", ["sdpa", "reference"])
@pytest.mark.parametrize("options", [{}, {"query_sees_prefix": True}, {"query_sees_queries": True}])
def test_query_tokens_do_not_change_cls_or_patches(backend, options):
    """The unidirectional property, end to end through every block."""
    model = tiny_backbone(backend, **options)
    x = torch.randn(3, 3, 32, 32)
    queries = torch.randn(3, 5, 3, 8, 8)
    with torch.no_grad():
        plain = model.forward_features(x)
        with_queries = model.forward_features(x, queries)
        other_queries = model.forward_features(x, 10 * torch.randn(3, 5, 3, 8, 8))
    assert plain["query"] is None and with_queries["query"].shape == (3, 5, 64)
    for key in ("cls", "patch"):
        torch.testing.assert_close(with_queries[key], plain[key], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(other_queries[key], plain[key], rtol=1e-5, atol=1e-5)
    # ...while the query outputs do depend on the query crops and on the image.
    assert not torch.allclose(with_queries["query"], other_queries["query"], atol=1e-3)
    moved = model.forward_features(torch.randn(3, 3, 32, 32), queries)
    assert not torch.allclose(moved["query"], with_queries["query"], atol=1e-3)


def test_query_gradient_does_not_reach_cls_path():
    """A loss on the query outputs only flows to the image through the raw tokens' keys/values."""
    model = tiny_backbone()
    x = torch.randn(2, 3, 32, 32)
    queries = torch.randn(2, 4, 3, 8, 8, requires_grad=True)
    cls = model.forward_features(x, queries)["cls"]
    (grad,) = torch.autograd.grad(cls.sum(), queries, allow_unused=True)
    assert grad is None or grad.abs().max() == 0


def test_query_tokens_have_no_position_and_are_independent_by_default():
    """Permuting the query crops permutes their outputs (no positional embedding, no query-query attention)."""
    model = tiny_backbone()
    x, queries = torch.randn(2, 3, 32, 32), torch.randn(2, 4, 3, 8, 8)
    perm = torch.tensor([2, 0, 3, 1])
    with torch.no_grad():
        a = model.forward_features(x, queries)["query"]
        b = model.forward_features(x, queries[:, perm])["query"]
        single = model.forward_features(x, queries[:, :1])["query"]
    torch.testing.assert_close(b, a[:, perm], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(single, a[:, :1], rtol=1e-5, atol=1e-5)


def test_other_crop_sizes_interpolate_the_positional_embedding():
    model = tiny_backbone()
    with torch.no_grad():
        out = model.forward_features(torch.randn(2, 3, 16, 24))
        same = model.forward_features(torch.randn(2, 3, 32, 32))
    assert out["patch"].shape == (2, 6, 64) and same["patch"].shape == (2, 16, 64)
    assert torch.equal(model.interpolate_pos_embed(4, 4), model.pos_embed)
    # DINO's: the trained 4 x 4 grid resized bicubically to the crop's (h, w) patch grid.
    grid = model.pos_embed[:, 1:].reshape(1, 4, 4, 64).permute(0, 3, 1, 2)
    want = F.interpolate(grid, size=(2, 3), mode="bicubic", align_corners=False).flatten(2).transpose(1, 2)
    torch.testing.assert_close(model.interpolate_pos_embed(2, 3), torch.cat([model.pos_embed[:, :1], want], 1))


@pytest.mark.parametrize("side,h,w", [(4, 2, 3), (14, 6, 6), (14, 16, 16), (3, 1, 1)])
def test_the_positional_embedding_is_resized_by_a_matrix_product(side, h, w):
    """The same values and gradient as F.interpolate's bicubic resize, with no upsampling
    op in forward or backward after the first call: its CUDA backward adds with atomics
    (not deterministic)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(str(func))
            return func(*args, **(kwargs or {}))

    model = VisionTransformer(img_size=8 * side, patch_size=8, embed_dim=32, depth=1, num_heads=2)
    weights = torch.randn(1, 1 + h * w, 32, dtype=torch.float64)
    model.interpolate_pos_embed(h, w)  # makes the matrix once (an upsample with no gradient)
    seen = []
    with Ops():
        out = model.interpolate_pos_embed(h, w)
        (out.double() * weights).sum().backward()
    assert not [op for op in seen if "upsample" in op or "interpolate" in op], seen
    got_grad, model.pos_embed.grad = model.pos_embed.grad, None
    grid = model.pos_embed[:, 1:].reshape(1, side, side, 32).permute(0, 3, 1, 2)
    want = torch.cat([model.pos_embed[:, :1], F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=False)
                      .flatten(2).transpose(1, 2)], 1)
    (want.double() * weights).sum().backward()
    torch.testing.assert_close(out, want, rtol=1e-5, atol=5e-6)  # float32 sums in another order
    torch.testing.assert_close(got_grad, model.pos_embed.grad, rtol=1e-5, atol=5e-6)


def test_the_resize_matrix_made_under_inference_mode_or_another_default_dtype_still_trains(monkeypatch):
    """The matrix is cached: the first caller's modes must not stick to it."""
    monkeypatch.setattr(adclr.model, "_RESAMPLING", {})
    model = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2)
    with torch.inference_mode():
        model.interpolate_pos_embed(2, 3)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        model.interpolate_pos_embed(3, 2)
    finally:
        torch.set_default_dtype(previous)
    for h, w in ((2, 3), (3, 2)):
        model.interpolate_pos_embed(h, w).sum().backward()
    assert model.pos_embed.grad is not None


def test_keeping_every_patch_is_the_whole_image():
    """`patches` indexes the patches (a masked image model's visible set), not the tokens."""
    model = tiny_backbone()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        whole, kept = model.forward_features(x), model.forward_features(x, patches=torch.arange(16).expand(2, 16))
    torch.testing.assert_close(kept["cls"], whole["cls"])
    torch.testing.assert_close(kept["patch"], whole["patch"])


def test_forward_masked_gives_the_visible_sets_cls_then_the_masked_sets():
    backbone = tiny_backbone()
    model = ADCLRModel(backbone, DINOHead(64, out_dim=128, hidden_dim=96, bottleneck_dim=32)).eval()
    x = torch.randn(2, 3, 32, 32)
    visible, masked = torch.tensor([[0, 3, 5, 6], [1, 2, 8, 9]]), torch.tensor([[1, 2, 4], [0, 3, 15]])
    with torch.no_grad():
        cls, pixels = model.forward_masked(x, visible, masked, decode=False)
        want = model.head(torch.cat([backbone.forward_features(x, patches=s)["cls"] for s in (visible, masked)]))
    assert pixels is None
    torch.testing.assert_close(cls, want)


@pytest.mark.parametrize("packed", [False, True])
def test_drop_path_keeps_or_drops_each_sequence_whole_and_rescales_what_it_keeps(packed):
    torch.manual_seed(0)
    lengths = [3, 5, 2, 6] * 50
    if packed:
        x = torch.ones(sum(lengths), 4)
        packing = SimpleNamespace(num_seqs=len(lengths), sequence_of_token=torch.repeat_interleave(
            torch.arange(len(lengths)), torch.tensor(lengths)))
    else:
        x, packing = torch.ones(len(lengths), 5, 4), None
    out = drop_path(x, 0.25, True, packing)
    values = [seq.unique().tolist() for seq in (out.split(lengths) if packed else out)]
    assert all(v in ([0.0], [pytest.approx(1 / 0.75)]) for v in values)
    assert 0.15 < sum(v == [0.0] for v in values) / len(values) < 0.35
    assert drop_path(x, 0.25, False, packing) is x


def test_deeper_blocks_drop_more():
    backbone = build_backbone("vit_test", 32, 8, drop_path_rate=0.2)
    assert [block.drop_path1.p for block in backbone.blocks] == pytest.approx([0.0, 0.2])


def test_bad_inputs_are_clear_errors():
    model = tiny_backbone()
    with pytest.raises(ValueError, match="multiple of the patch size"):
        model.forward_features(torch.randn(1, 3, 30, 32))
    with pytest.raises(ValueError, match="query_crops must have shape"):
        model.forward_features(torch.randn(1, 3, 32, 32), torch.randn(1, 2, 3, 16, 16))
    with pytest.raises(ValueError, match="unknown arch"):
        build_backbone("vit_huge_typo")


def test_head_is_normalised_and_shared_by_cls_and_queries():
    torch.manual_seed(0)
    backbone = tiny_backbone()
    head = DINOHead(64, out_dim=128, hidden_dim=96, bottleneck_dim=32)
    model = ADCLRModel(backbone, head).eval()
    x, queries, local = torch.randn(2, 3, 32, 32), torch.randn(2, 3, 3, 8, 8), torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        cls, query = model(x, queries, local)
        feats = backbone.forward_features(x, queries)
        expected_query = head(feats["query"])
        expected_local = head(backbone.forward_features(local)["cls"])
    assert cls.shape == (6, 128) and query.shape == (2, 3, 128)
    torch.testing.assert_close(query, expected_query)
    torch.testing.assert_close(cls[2:], expected_local)
    # Logits are cosines between a unit bottleneck vector and unit prototypes.
    assert cls.abs().max() <= 1 + 1e-5
    scaled = DINOHead(64, 128, 96, 32)
    scaled.load_state_dict(head.state_dict())
    with torch.no_grad():
        scaled.last_layer.weight.mul_(7.0)
        torch.testing.assert_close(scaled(feats["cls"]), head(feats["cls"]))


def test_timm_checkpoint_round_trip_is_lossless():
    """A timm vit_small_patch16_224 state dict (names and shapes as recorded from timm)
    loads into adclr's vit_small strictly, and comes back out bit for bit."""
    import json
    import pathlib

    record = pathlib.Path(__file__).parents[1] / "adclr_kernels" / "data" / "timm_vit_small_patch16_224.json"
    shapes = json.loads(record.read_text())["state_dict"]
    g = torch.Generator().manual_seed(0)
    timm_sd = {k: torch.randn(v, generator=g) for k, v in shapes.items()}
    backbone = build_backbone("vit_small", 224, 16)
    # The classifier head is timm's, not the backbone's; everything else must match.
    backbone.load_state_dict({k: v for k, v in timm_sd.items() if not k.startswith("head.")}, strict=True)
    back = backbone.state_dict()
    assert back.keys() == {k for k in timm_sd if not k.startswith("head.")}
    assert all(torch.equal(back[k], timm_sd[k]) for k in back)


def test_trained_gain_scales_each_prototype_and_old_head_state_loads():
    torch.manual_seed(0)
    fixed = DINOHead(64, out_dim=128, hidden_dim=96, bottleneck_dim=32)
    trained = DINOHead(64, 128, 96, 32, norm_last_layer=False)
    assert set(trained.state_dict()) == set(fixed.state_dict()) | {"last_layer.gain"}
    trained.load_state_dict(fixed.state_dict(), strict=False)  # a head saved before the option
    x = torch.randn(5, 64)
    with torch.no_grad():
        torch.testing.assert_close(trained(x), fixed(x))  # gain 1: the fixed head exactly
        trained.last_layer.gain[:, 0] = torch.arange(1.0, 129.0)
        torch.testing.assert_close(trained(x), fixed(x) * torch.arange(1.0, 129.0))


def test_intermediate_layers_are_dino_s():
    model = tiny_backbone()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        layers = model.get_intermediate_layers(x, 2)
        tokens, _ = model.embed(x)
        first = model.norm(model.blocks[0](tokens))
    assert len(layers) == 2 and layers[0].shape == (3, 17, 64)
    torch.testing.assert_close(layers[0], first)  # each block's output through the final norm
    final = model.forward_features(x)
    torch.testing.assert_close(layers[1][:, 0], final["cls"])
    torch.testing.assert_close(layers[1][:, 1:], final["patch"])
    with pytest.raises(ValueError, match="n must be between 1 and the depth 2, got 3"):
        model.get_intermediate_layers(x, 3)


def test_the_readme_attention_table_is_what_its_flags_do():
    """Each row of the README's query-attention table, run through `adclr train`'s flags and
    the trainer's model: a query token attends to exactly the tokens the row names."""
    import argparse
    import pathlib
    import re

    from adclr.cli import add_config_flags
    from adclr.config import Config
    from adclr.train import build
    from adclr_kernels import unidirectional_attention

    readme = (pathlib.Path(__file__).parents[2] / "README.md").read_text()
    section = readme.split("### Which tokens a query crop attends to")[1].split("\n#")[0]
    rows = [[cell.strip() for cell in line.split("|")[1:4]] for line in section.splitlines()
            if line.startswith("| ") and not line.startswith("| a query token")]
    assert len(rows) == 3
    parser = argparse.ArgumentParser()
    add_config_flags(parser)
    tiny = ["--arch", "vit_test", "--patch-size", "8", "--image-size", "32", "--out-dim", "64",
            "--head-hidden-dim", "32", "--head-bottleneck-dim", "16", "--device", "cpu"]
    P, N, Q = 1, 4, 3
    name = {**dict.fromkeys(range(P), "CLS"), **dict.fromkeys(range(P, P + N), "raw patches"),
            P + N + 1: "itself"}
    for sees, _, flags in rows:
        cfg = Config(**vars(parser.parse_args(tiny + re.findall(r"--[a-z-]+", flags))))
        options = build(cfg, "cpu").student_module.backbone.blocks[0].query_options
        q, k = torch.randn(2, 1, 1, P + N + Q, 8)
        v = torch.randn(1, 1, P + N + Q, 8, requires_grad=True)
        unidirectional_attention(q, k, v, Q, P, backend="reference", **options)[0, 0, P + N + 1].sum().backward()
        seen = {name.get(c, "another query") for c in v.grad[0, 0].abs().sum(-1).nonzero().flatten().tolist()}
        assert seen == set(sees.split(", ")), (flags, options)
