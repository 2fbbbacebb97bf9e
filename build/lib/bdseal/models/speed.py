"""Training-throughput benchmark: images/s for forward + backward + SGD step on random data."""

from __future__ import annotations

import contextlib
import copy
import time

import torch
from torch import nn


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_throughput(
    model: nn.Module,
    batch_size: int = 256,
    image_size: int = 32,
    channels: int = 3,
    steps: int = 5,
    warmup: int = 2,
    device: str | torch.device = "cpu",
    channels_last: bool = True,
) -> float:
    """Training images per second of ``model`` (timed over ``steps`` after ``warmup`` steps).

    Works on a deep copy, so ``model`` itself is left untouched. On CUDA the forward pass runs under
    autocast (bf16 where supported, else fp16 with a grad scaler); on CPU it stays in fp32.
    """
    if steps < 1:
        raise ValueError("steps must be >= 1")
    dev = torch.device(device)
    net = copy.deepcopy(model).to(dev).train()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    net = net.to(memory_format=fmt)
    num_classes = getattr(net, "num_classes", None)

    x = torch.rand(batch_size, channels, image_size, image_size, device=dev)
    x = x.contiguous(memory_format=fmt)
    if num_classes is None:
        with torch.no_grad():
            num_classes = net(x[:1]).shape[1]
    y = torch.randint(0, num_classes, (batch_size,), device=dev)

    opt = torch.optim.SGD(net.parameters(), lr=1e-3, momentum=0.9)
    use_amp = dev.type == "cuda"
    amp_dtype = torch.bfloat16 if use_amp and torch.cuda.is_bf16_supported() else torch.float16
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and amp_dtype == torch.float16)
    loss_fn = nn.CrossEntropyLoss()

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        ctx = torch.autocast("cuda", dtype=amp_dtype) if use_amp else contextlib.nullcontext()
        with ctx:
            loss = loss_fn(net(x), y)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    for _ in range(warmup):
        step()
    _sync(dev)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(dev)
    return batch_size * steps / (time.perf_counter() - start)
