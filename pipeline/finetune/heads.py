"""Deterministic initialisation of what a task adds to a pretrained model (e.g. the `score` head of
AutoModelForSequenceClassification, which transformers initialises from the global RNG).

Each named parameter gets values drawn from its own generator, seeded by the run's seed and the
parameter's name: the same values on every rank and in every run of a config, whatever the global
RNG state, the order of the names or what else was initialised before. Weight matrices are drawn
from N(0, std) (std = the model config's `initializer_range`, transformers' own choice for new
Linear layers), biases are zero and other vectors (norm scales) one. `init_new_weights` does it on
every rank of a run, also under ZeRO-3, where the parameters are partitioned as they load: it
gathers them (through the engine module), initialises them on every rank, keeps rank 0's values
and checks that every rank computed the same.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import torch

from pipeline import dist


def name_seed(seed: int, name: str) -> int:
    """A 63-bit generator seed from the run's seed and a parameter name."""
    digest = hashlib.sha256(f"{seed}\x00{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


@torch.no_grad()
def init_new_parameters(
    model: torch.nn.Module, names: Iterable[str], seed: int, std: float | None = None
) -> list[str]:
    """Re-initialise the named parameters (e.g. the `missing_keys` transformers reports when it loads
    a model with a new head) from `seed` alone; returns the names, sorted. KeyError on an unknown name."""
    params = dict(model.named_parameters())
    if std is None:
        std = float(getattr(model.config, "initializer_range", 0.02))
    done = sorted(set(names))
    for name in done:
        p = params[name]
        if p.dim() < 2:
            p.fill_(0.0 if name.endswith("bias") else 1.0)
            continue
        gen = torch.Generator().manual_seed(name_seed(seed, name))
        p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32).mul_(std).to(p.dtype))
    return done


@torch.no_grad()
def init_new_weights(model: torch.nn.Module, names: Iterable[str], seed: int) -> list[str]:
    """init_new_parameters on every rank of the run (collective: every rank passes the same names),
    ZeRO-3 partitioned parameters included; RuntimeError if two ranks computed different values."""
    from pipeline.runtime.engine import gathered

    done = sorted(set(names))
    params = [dict(model.named_parameters())[n] for n in done]
    with gathered(params):
        init_new_parameters(model, done, seed)
        sums = [float(p.double().sum()) for p in params] + [float(p.double().abs().sum()) for p in params]
        high, low = dist.max_floats(sums), dist.max_floats([-x for x in sums])
        if any(h != -lo for h, lo in zip(high, low)):
            raise RuntimeError(f"new parameters {done} differ between ranks after a seeded init")
    return done
