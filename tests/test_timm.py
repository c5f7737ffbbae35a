"""Against real timm (issue 20, point 10): the export's timm layout computes what the encoder
computes, and MaskedCrossAttention.from_timm computes what timm's q/kv attention computes.

timm needs torchvision, and PyPI's torchvision does not import beside the CPU torch 2.13 build:
these tests run where timm imports (the README's "Testing against timm": a venv with torch
2.14.1 + torchvision 0.29.1; the GPU machine) and skip with that reason elsewhere.
"""
import pytest
import torch

from loca_kernels import MaskedCrossAttention
from loca_train import export, preset
from loca_train.networks import Encoder
from helpers import assert_close, backend_params

try:
    import timm
    from timm.layers import AttentionPoolLatent
except Exception as error:  # noqa: BLE001 (timm fails in several ways beside the CPU torch 2.13 build)
    pytest.skip(f"timm does not import here ({type(error).__name__}: {error}); the README's 'Testing against "
                "timm' says where it does", allow_module_level=True)


def _timm_patch_tokens(model, images):
    """timm's ViT on its patch tokens alone: LOCA's encoder has no class token."""
    tokens = model.patch_embed(images) + model.pos_embed[:, model.num_prefix_tokens:]
    return model.norm(model.blocks(model.norm_pre(tokens)))


@pytest.mark.parametrize("name,image_size", [("vit_s16", 224), ("vit_b16", 224), ("vit_s16", 288)])
def test_export_runs_in_timm_as_the_encoder(name, image_size):
    cfg = preset(name)
    torch.manual_seed(0)
    encoder = Encoder(cfg).eval()
    state = export.to_timm(encoder.state_dict(), cfg, image_size)
    # The model the export's message tells the user to build (timm.create_model at 224).
    model = eval(export.timm_model(cfg, image_size), {"timm": timm}).eval()
    if image_size == 224:
        assert export.TIMM_NAMES[name] in export.timm_model(cfg, image_size)
    model.load_state_dict(state)                                  # strict: every key and shape
    images = torch.randn(2, 3, image_size, image_size)
    with torch.no_grad():
        assert_close(_timm_patch_tokens(model, images), encoder(images), torch.float32)


@pytest.mark.parametrize("qkv_bias", [True, False])
@pytest.mark.parametrize("backend,device", backend_params("attention_forward"))
def test_from_timm_matches_timms_attention_pool(qkv_bias, backend, device):
    dim, heads, latents, tokens = 64, 4, 3, 11
    torch.manual_seed(0)
    pool = AttentionPoolLatent(dim, num_heads=heads, latent_len=latents, qkv_bias=qkv_bias, pool_type="")
    pool = pool.to(device).eval()
    torch.nn.init.normal_(pool.latent)
    pool.mlp = None               # timm's pool adds an MLP after the attention; compare the attention
    attn = MaskedCrossAttention.from_timm(pool, backend=backend)
    x = torch.randn(2, tokens, dim, device=device)
    keep = torch.rand(2, tokens, device=device) < 0.5
    keep[:, 3] = True
    with torch.no_grad():
        for k, mask in ((None, None), (keep, keep[:, None, None, :])):
            got = attn(pool.latent.expand(2, -1, -1), x, k)
            assert_close(got, pool(x, attn_mask=mask), torch.float32)
