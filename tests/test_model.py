import math

import pytest
import torch
import torch.nn.functional as F

from nanodist.model.hf import load_hf_state_dict
from nanodist.model.gpt import GPT, PRESETS, GPTConfig, model_config, padded_vocab_size, parameter_seed
from nanodist.model.loss import cross_entropy
from nanodist.parallel.init import materialize

SMALL = GPTConfig(block_size=32, vocab_size=128, n_layer=2, n_head=4, n_embd=64)


def test_logits_shape_and_padded_vocab():
    model = GPT(SMALL)
    idx = torch.randint(0, 128, (3, 17))
    assert model(idx).shape == (3, 17, 128)
    assert padded_vocab_size(50257) == 50304 and padded_vocab_size(65) == 128


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_preset_parameter_count(preset):
    """GPT-2's count: V C + T C + L (12 C^2 + 13 C) + 2 C, lm_head tied (counted once)."""
    cfg = model_config(preset, block_size=1024, vocab_size=50257)
    with torch.device("meta"):
        model = GPT(cfg, seed=None)
    V, T, C, L = cfg.vocab_size, cfg.block_size, cfg.n_embd, cfg.n_layer
    assert sum(p.numel() for p in model.parameters()) == V * C + T * C + L * (12 * C * C + 13 * C) + 2 * C
    assert model.lm_head.weight is model.transformer.wte.weight


def test_state_dict_uses_gpt2_names():
    names = set(GPT(SMALL).state_dict())
    for name in ("transformer.wte.weight", "transformer.wpe.weight", "transformer.h.1.ln_1.weight",
                 "transformer.h.0.attn.c_attn.weight", "transformer.h.0.attn.c_proj.bias",
                 "transformer.h.0.ln_2.bias", "transformer.h.0.mlp.c_fc.weight",
                 "transformer.h.0.mlp.c_proj.weight", "transformer.ln_f.weight", "lm_head.weight"):
        assert name in names


def test_gpt2_initialisation():
    cfg = model_config("tiny", block_size=64, vocab_size=65)
    model = GPT(cfg, seed=3)
    h = model.transformer.h[0]
    # residual projections scaled by 1/sqrt(2 n_layer); 65,536 samples: std within 2%
    assert h.mlp.c_proj.weight.std().item() == pytest.approx(0.02 / math.sqrt(2 * cfg.n_layer), rel=0.02)
    assert h.mlp.c_fc.weight.std().item() == pytest.approx(0.02, rel=0.02)
    assert torch.equal(h.attn.c_attn.bias, torch.zeros_like(h.attn.c_attn.bias))
    assert torch.equal(h.ln_1.weight, torch.ones_like(h.ln_1.weight))


def test_initialisation_depends_on_seed_and_name_only():
    a, b, c = GPT(SMALL, seed=5), GPT(SMALL, seed=5), GPT(SMALL, seed=6)
    for (name, pa), pb, pc in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert torch.equal(pa, pb), name
        if pa.std() > 0:
            assert not torch.equal(pa, pc), name
    assert parameter_seed(5, "transformer.h.0.attn.c_attn.weight") != parameter_seed(5, "transformer.h.1.attn.c_attn.weight")
    w0, w1 = a.transformer.h[0].attn.c_attn.weight, a.transformer.h[1].attn.c_attn.weight
    assert not torch.equal(w0, w1)


def test_initial_values_are_drawn_on_the_cpu_whatever_the_default_device():
    """Under `with torch.device("cuda")` the trainer builds the model; the values must not
    follow it (a CPU generator cannot draw on CUDA, and CPU and GPU runs must agree).
    The meta device stands in for CUDA here."""
    model = GPT(SMALL, seed=2)
    with torch.device("meta"):
        values = {name: model.initial_value(name, 2, p.shape) for name, p in model.named_parameters()}
    for name, p in model.named_parameters():
        assert values[name].device.type == "cpu" and torch.equal(values[name], p), name


def test_deferred_materialisation_equals_eager_init():
    eager = GPT(SMALL, seed=11)
    with torch.device("meta"):
        deferred = GPT(SMALL, seed=None)
    materialize(deferred, deferred, seed=11, device=torch.device("cpu"))
    assert deferred.lm_head.weight is deferred.transformer.wte.weight
    for (name, p), q in zip(eager.named_parameters(), deferred.parameters()):
        assert torch.equal(p, q), name


def test_cross_entropy_matches_torch_and_ignores_index():
    logits = torch.randn(2, 5, 11, dtype=torch.float64)
    targets = torch.randint(0, 11, (2, 5))
    targets[0, 1] = -1
    expected = F.cross_entropy(logits.view(-1, 11), targets.view(-1), ignore_index=-1)
    assert torch.allclose(cross_entropy(logits, targets).double(), expected, rtol=1e-6)


def test_hugging_face_gpt2_weights_give_the_same_logits():
    import transformers  # in the dev extra; loading is tested offline on a random model
    hf_cfg = transformers.GPT2Config(vocab_size=100, n_positions=32, n_embd=64, n_layer=2,
                                     n_head=4, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(hf_cfg).eval()
    ours = load_hf_state_dict(GPT(SMALL), hf.state_dict())
    idx = torch.randint(0, 100, (2, 32))
    with torch.no_grad():
        expected = hf(idx).logits
        got = ours(idx)[..., :100]
    # same fp32 arithmetic up to op order (Conv1D addmm vs Linear): 1e-5 holds
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # the hub's gpt2 files hold GPT2Model's keys (no "transformer." prefix): the same model
    bare = load_hf_state_dict(GPT(SMALL), hf.transformer.state_dict())
    with torch.no_grad():
        assert torch.equal(bare(idx), ours(idx))
