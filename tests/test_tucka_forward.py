"""The TuckA forward against the paper's equations, built densely and independently of the implementation."""

from __future__ import annotations

import peft
import pytest
import torch
from conftest import tucka_llama
from torch import nn

import tucka_llm
from tucka_llm.tucka.model import routing_states


class TwoLinear(nn.Module):
    def __init__(self, d: int = 24, hidden: int = 20, out: int = 12) -> None:
        super().__init__()
        self.first = nn.Linear(d, hidden)
        self.second = nn.Linear(hidden, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(self.first(x))


def dense_expert_tensor(G: torch.Tensor, C: torch.Tensor, U: torch.Tensor, group: int) -> torch.Tensor:
    """T_i = G_i x1 C x2 U x3 U (paper Eq. 5) with each factor divided by its Frobenius norm: shape (t, d, d)."""
    g, c, u = G[group] / G[group].norm(), C / C.norm(), U / U.norm()
    return torch.einsum("qrs,jq,ar,bs->jab", g, c, u, u)


def dense_forward(layer: nn.Linear, x: torch.Tensor, T: torch.Tensor, gates: torch.Tensor, alpha: float):
    """Eq. 9: y = (x + alpha x sum_j g_j T_i[j]) W^T + b."""
    A = torch.einsum("j,jab->ab", gates, T)
    return layer(x + alpha * x @ A)


def randomise_adapter(model: nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "tucka_" in name:
                param.copy_(torch.randn(param.shape, generator=generator))


@pytest.mark.parametrize("seed", range(5))
def test_adapter_output_equals_dense_mode_product_construction(seed):
    torch.manual_seed(seed)
    base = TwoLinear()
    reference = TwoLinear()
    reference.load_state_dict(base.state_dict())
    config = tucka_llm.TuckAConfig(r=3, k=4, t=3, p=2, alpha=2.5, target_modules=["first", "second"])
    model = peft.get_peft_model(base, config)
    randomise_adapter(model, seed)
    generator = torch.Generator().manual_seed(100 + seed)
    group = int(torch.randint(0, 4, (1,), generator=generator))
    gates = torch.rand(3, generator=generator)
    x = torch.randn(5, 7, 24, generator=generator)

    with tucka_llm.routing(model, tucka_llm.Route(group, gates.tolist())), torch.no_grad():
        actual = model(x)

    layers = {name.split(".")[-1]: m for name, m in model.named_modules() if isinstance(m, tucka_llm.TuckALayer)}
    hidden = x
    for name in ("first", "second"):
        layer = layers[name]
        T = dense_expert_tensor(
            layer.tucka_core["default"], layer.tucka_expert["default"], layer.tucka_subspace["default"], group
        )
        hidden = dense_forward(getattr(reference, name), hidden, T, gates, 2.5)
    expected = hidden.detach()
    assert (actual - expected).norm() / expected.norm() <= 1e-5


def test_batch_route_follows_eqs_6_to_8_on_real_tokens_only(batch):
    model = tucka_llama(seed=1)
    router = next(m for m in model.modules() if isinstance(m, tucka_llm.TuckALayer) and m.tucka_router)
    randomise_adapter(model, 3)
    with tucka_llm.routing(model, "batch"), torch.no_grad():
        model(**batch)
        route = routing_states(model)["default"].route
        llama = model.base_model.model.model
        x = llama.layers[0].input_layernorm(llama.embed_tokens(batch["input_ids"]))  # the input of layer 0's q_proj

    mask = batch["attention_mask"]
    per_sequence = torch.stack([x[b, mask[b].bool()].mean(dim=0) for b in range(x.shape[0])])
    h = per_sequence.mean(dim=0)
    E = router.router("default").centroids
    logits = (E @ h).view(3, 2)
    scores = torch.sigmoid(logits / logits.norm(dim=1, keepdim=True)).flatten()
    winner = int(scores.argmax())
    group = winner // 2
    gates = scores[group * 2 : group * 2 + 2] / scores[group * 2 : group * 2 + 2].sum()
    assert route.group.tolist() == [group]
    torch.testing.assert_close(route.gates[0], gates, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_base_keeps_the_update(batch, dtype):
    """Adapter math in fp32, one rounding into the base dtype: the adapted model is as close to its fp32 twin as
    the plain base model is to its own, and the update's effect on the logits keeps its direction."""
    route = tucka_llm.Route(1, [0.3, 0.7])

    def adapted_and_base(model):
        with tucka_llm.routing(model, route), torch.no_grad():
            adapted = model(**batch).logits.float()
            with model.disable_adapter():
                base = model(**batch).logits.float()
        return adapted, base

    full = tucka_llama(seed=2)
    low = tucka_llama(seed=2, dtype=dtype)
    low.load_state_dict(full.state_dict())
    assert all(p.dtype == torch.float32 for n, p in low.named_parameters() if "tucka_" in n)
    assert low.base_model.model.lm_head.weight.dtype == dtype

    adapted_full, base_full = adapted_and_base(full)
    adapted_low, base_low = adapted_and_base(low)
    update_full, update_low = adapted_full - base_full, adapted_low - base_low

    def rel(a, b):
        return float((a - b).norm() / b.norm())

    cosine = float(torch.nn.functional.cosine_similarity(update_low.flatten(), update_full.flatten(), dim=0))
    print(
        f"{dtype}: update/logits {rel(adapted_full, base_full):.3f}; error vs fp32: "
        f"adapted {rel(adapted_low, adapted_full):.4f}, base {rel(base_low, base_full):.4f}; "
        f"cosine(update, fp32 update) {cosine:.4f}"
    )
    assert rel(adapted_full, base_full) > 0.02  # the update is not negligible
    assert rel(adapted_low, adapted_full) <= 1.5 * rel(base_low, base_full)
    assert cosine > 0.98
