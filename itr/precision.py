"""Mixed precision for the DDP / single-process path: autocast plus, for fp16, a dynamic loss scaler.

Done here rather than by accelerate because accelerate quietly runs ``fp16`` in fp32 on a
CPU. fp16 steps whose gradients overflow are skipped by the scaler and counted, never
applied. Under DeepSpeed, precision and loss scaling belong to the DeepSpeed engine.
"""
from contextlib import nullcontext

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class Precision:
    def __init__(self, mode, device, deepspeed=False):
        self.mode = mode
        self.device_type = torch.device(device).type
        self.deepspeed = deepspeed
        self.scaler = None
        if mode == "fp16" and not deepspeed:
            self.scaler = torch.amp.GradScaler(self.device_type)

    def autocast(self):
        if self.mode == "no" or self.deepspeed:  # DeepSpeed casts the weights itself
            return nullcontext()
        return torch.autocast(self.device_type, dtype=DTYPES[self.mode])

    def scale(self, loss):
        return self.scaler.scale(loss) if self.scaler is not None else loss

    def unscale_(self, optimizer):
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)

    def step(self, optimizer):
        """Optimizer step; returns True when the step was skipped (fp16 overflow)."""
        if self.scaler is None:
            optimizer.step()
            return False
        before = self.scaler.get_scale()
        self.scaler.step(optimizer)
        self.scaler.update()
        return self.scaler.get_scale() < before
