"""Optimisers and learning-rate schedules.

Muon (Keller Jordan's, as in modded-nanogpt and Moonlight) for the 2-D hidden matrices: attention's output
projection, the MLPs, the stacked experts (each expert's gate, up and down matrix is orthogonalised on its
own) and the MTP projections; AdamW for everything else: embeddings, the output head, norm gains, the router,
and attention's input projections (queries, keys and values; for MLA the query and the latent's down and up
projections). The expert bias `e_score_correction_bias` is a buffer, moved only by the aux-loss-free update,
never by an optimiser.

Why attention's inputs take AdamW: measured on the default corpus (150 steps of 32x128 tokens, same shards and
schedule, val bits per byte), moving them from Muon to AdamW improved the dense preset 1.3865 -> 1.3685 and
the cpu preset without MTP 1.408 -> 1.355; MLA suffered most (its keys and values are the product of two
low-rank factors, kv_b_proj and kv_a_proj_with_mqa, both of which Muon moved at full spectral step).

Muon's default rate depends on the model (default_muon_lr): 0.005 with routed experts, 0.01 dense. Measured
the same way (150 steps, val bits per byte), Muon rate 0.02 / 0.01 / 0.005: cpu preset 1.3507 / 1.3175 / 1.3027,
dense preset 1.3685 / 1.3552 / 1.3785; and in the 240 s race of the two presets (bench/pretrain.py's P2)
cpu 1.2042 -> 1.1457 going from 0.02 to 0.005. Rechecked for the cpu preset without its MTP module (400 steps):
0.005 1.0857, 0.01 1.0959, and 0.01 for all but the experts (0.005) 1.0907.

The routed experts' matrices take 3 Newton-Schulz steps instead of 5 (EXPERT_NS_STEPS): a partial
orthogonalisation that lifts the update's large singular values to ~1 but leaves its smallest ones, the
noisiest directions of a matrix that saw only the tokens routed to it, below 1; and 40% less optimiser work on
the largest group of matrices. Measured on the cpu preset (400 steps, default corpus, val bits per byte, seeds
0 / 1): 5 steps 1.0857 / 1.0823, 3 steps 1.0752 / 1.0830, 2 steps 1.0895, 1 step 1.0975 (seed 0), at 4.7%
more tokens per second (6637 vs 6340, back to back). 3 steps for every matrix was worse (cpu 1.0888; dense
1.1003 against 1.0901), and AdamW for the experts far worse (1.1487 at 3e-3, 1.2398 at 6e-3).
"""

from __future__ import annotations

import math

import torch

# Newton-Schulz quintic coefficients tuned for the steepest slope at 0 (Keller Jordan's Muon)
NS_COEFFS = (3.4445, -4.7750, 2.0315)


def orthogonalize(g: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """Approximately U V^T of g = U S V^T for a batch of matrices [..., m, n], computed and returned in bf16."""
    a, b, c = NS_COEFFS
    x = g.bfloat16().reshape(-1, *g.shape[-2:])
    transposed = x.shape[-2] > x.shape[-1]
    if transposed:
        x = x.mT
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    for _ in range(steps):  # x <- a x + (b A + c A^2) x with A = x x^T, the scaled sums fused into the matmuls
        A = x @ x.mT
        x = torch.baddbmm(x, torch.baddbmm(A, A, A, beta=b, alpha=c), x, beta=a)
    return (x.mT if transposed else x).reshape(g.shape)


class Muon(torch.optim.Optimizer):
    """Momentum, then orthogonalise the update. Parameters may carry a `muon_view` attribute: a shape
    that splits a stacked tensor into its matrices (e.g. gate_up [E, 2I, H] -> [2E, I, H]), and a
    `muon_ns_steps` attribute overriding the group's number of Newton-Schulz steps."""

    def __init__(self, params, lr=0.02, momentum=0.95, nesterov=True, weight_decay=0.0, ns_steps=5):
        super().__init__(params, dict(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay,
                                      ns_steps=ns_steps))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            # matrices of one shape (up to a transpose) and one number of Newton-Schulz steps are orthogonalised
            # together, as one batch: the cpu preset's 22 Muon tensors take 4 calls, the dense preset's 16 take 2.
            # Measured on the Intel Xeon with AMX (Muon's step on all of a preset's matrices, best of 12), with the
            # fused baddbmm of orthogonalize: cpu 52.5 -> 47.4 ms, dense 41.0 -> 19.8 ms. The momentum as foreach ops,
            # the cast to bf16 before concatenating and the bf16 update added with its scale folded into alpha (no fp32
            # copy of it): cpu 51.3 -> 47.9 ms (median of 10, interleaved), dense 18.1 -> 17.8 ms.
            params = [p for p in group["params"] if p.grad is not None]
            for p in params:
                if "momentum_buffer" not in self.state[p]:
                    self.state[p]["momentum_buffer"] = torch.zeros_like(p)
            grads = [p.grad for p in params]
            bufs = [self.state[p]["momentum_buffer"] for p in params]
            torch._foreach_lerp_(bufs, grads, 1 - group["momentum"])
            updates = torch._foreach_lerp(grads, bufs, group["momentum"]) if group["nesterov"] else bufs
            if group["weight_decay"]:
                torch._foreach_mul_(params, 1 - group["lr"] * group["weight_decay"])
            batches: dict[tuple, list] = {}
            for p, update in zip(params, updates):
                shape = getattr(p, "muon_view", p.shape)
                m = update.bfloat16().reshape(-1, *shape[-2:])  # cast before the batch is concatenated
                tall = m.shape[-2] > m.shape[-1]
                m = m.mT if tall else m
                steps = getattr(p, "muon_ns_steps", group["ns_steps"])
                batches.setdefault((*m.shape[-2:], steps), []).append((p, m, tall))
            for (*_, steps), items in batches.items():
                mats = [m for _, m, _ in items]
                ortho = orthogonalize(torch.cat(mats), steps)
                for (p, _, tall), o in zip(items, ortho.split([m.shape[0] for m in mats])):
                    o = o.mT if tall else o
                    # the bf16 update is added to the fp32 weight directly, its scale folded into alpha
                    scale = max(1.0, o.shape[-2] / o.shape[-1]) ** 0.5
                    p.add_(o.reshape(p.shape), alpha=-group["lr"] * scale)


EXPERT_NS_STEPS = 3

# attention's input projections (MHA and MLA, with or without q LoRA): AdamW, see above
ATTENTION_INPUTS = ("q_proj", "k_proj", "v_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj")


def param_groups(model) -> tuple[list, list]:
    """(muon params, adamw params): Muon takes the hidden matrices except attention's input projections; AdamW
    those, the embeddings, head, norms and router."""
    muon, adamw = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        module = name.split(".")[-2]
        hidden_matrix = p.ndim >= 2 and module not in ("embed_tokens", "lm_head", "gate", *ATTENTION_INPUTS)
        if name.endswith("experts.gate_up_proj"):  # gate and up are separate matrices per expert
            E, two_i, H = p.shape
            p.muon_view = (2 * E, two_i // 2, H)
        if ".experts." in name:  # the routed experts' matrices: a partial orthogonalisation (see above)
            p.muon_ns_steps = EXPERT_NS_STEPS
        (muon if hidden_matrix else adamw).append(p)
    return muon, adamw


def default_muon_lr(model) -> float:
    """Muon's rate for a model (see the module docstring): lower with routed experts, whose matrices each see
    only the tokens routed to them."""
    return 0.005 if model.moe_layers() else 0.01


class Optimizers:
    """Muon + AdamW (or AdamW alone) stepped together; `set_lr(scale)` applies the schedule to both."""

    def __init__(self, model, kind: str = "muon", lr: float = 3e-3, muon_lr: float | None = None,
                 weight_decay: float = 0.0, betas=(0.9, 0.95)):
        muon, adamw = param_groups(model)
        muon_lr = default_muon_lr(model) if muon_lr is None else muon_lr
        # torch's fused AdamW (one kernel over all tensors) on CPU too: the cpu preset's AdamW step 4.8 -> 1.9 ms,
        # dense 5.7 -> 2.0 ms on the AMD EPYC (median of 8, interleaved with the foreach implementation)
        fused = {"fused": True} if next(model.parameters()).device.type in ("cpu", "cuda") else {}
        if kind == "muon":
            self.opts = [Muon(muon, lr=muon_lr, weight_decay=weight_decay),
                         torch.optim.AdamW(adamw, lr=lr, betas=betas, weight_decay=0.0, eps=1e-10, **fused)]
        elif kind == "adamw":
            self.opts = [torch.optim.AdamW([{"params": muon, "weight_decay": weight_decay},
                                            {"params": adamw, "weight_decay": 0.0}],
                                           lr=lr, betas=betas, eps=1e-10, **fused)]
        else:
            raise ValueError(f"unknown optimizer {kind!r}")
        for opt in self.opts:
            for g in opt.param_groups:
                g["base_lr"] = g["lr"]

    def set_lr(self, scale: float) -> None:
        for opt in self.opts:
            for g in opt.param_groups:
                g["lr"] = g["base_lr"] * scale

    def rates(self) -> dict:
        """The learning rates in force: {"lr": AdamW's, "muon_lr": Muon's (with Muon)}."""
        rates = {"lr": self.opts[-1].param_groups[0]["lr"]}
        if isinstance(self.opts[0], Muon):
            rates["muon_lr"] = self.opts[0].param_groups[0]["lr"]
        return rates

    def step(self) -> None:
        for opt in self.opts:
            opt.step()

    def zero_grad(self) -> None:
        for opt in self.opts:
            opt.zero_grad(set_to_none=True)

    def state_dict(self) -> list[dict]:
        return [opt.state_dict() for opt in self.opts]

    def load_state_dict(self, states: list[dict]) -> None:
        """The saved moments and step counts; the learning rates and weight decay stay this run's (torch would take
        the saved ones: a resume with a lower --lr would not lower it)."""
        for opt, s in zip(self.opts, states, strict=True):
            settings = [(g["base_lr"], g["weight_decay"]) for g in opt.param_groups]
            opt.load_state_dict(s)
            for g, (base_lr, weight_decay) in zip(opt.param_groups, settings):
                g["base_lr"], g["weight_decay"] = base_lr, weight_decay


def lr_scale(progress: float, schedule: str, warmup: float, decay: float, min_ratio: float = 0.0) -> float:
    """Multiplier of the base LR at progress in [0, 1] (fraction of steps or of the time budget).

    wsd: linear warm-up over `warmup`, flat, then linear decay to min_ratio over the last `decay`.
    cosine: linear warm-up, then cosine to min_ratio.
    """
    p = min(max(progress, 0.0), 1.0)
    if warmup > 0 and p < warmup:
        return (p + 1e-3) / (warmup + 1e-3)
    if schedule == "wsd":
        if p < 1 - decay:
            return 1.0
        return min_ratio + (1 - min_ratio) * (1 - p) / max(decay, 1e-9)
    if schedule == "cosine":
        t = (p - warmup) / max(1 - warmup, 1e-9)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t))
    if schedule == "constant":
        return 1.0
    raise ValueError(f"unknown schedule {schedule!r}")
