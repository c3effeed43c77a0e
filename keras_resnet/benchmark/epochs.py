"""Whole training epochs on real images, the data on the device: keras_resnet on the JAX
backend (:mod:`keras_resnet.pipeline.training.device_data`, as ``tools/train.py`` trains there)
and its plain PyTorch twin, for the ``gpu`` mode.

A task ``"epoch:N"`` is one epoch of N training images (the full batches of one pass);
``step`` returns once the epoch's last update is done. Neither side validates or writes
checkpoints: the epochs are the training part of a run's epochs. Both read the same
folder with the same decoder (:func:`keras_resnet.pipeline.data.arrays.load_arrays`), hold the
uint8 images on the device, and augment there (zero-pad by size/8, random crop, flip),
with the same recipe (SGD, momentum, weight decay on kernels, label smoothing).
"""

from __future__ import annotations

import time

from keras_resnet.benchmark.benches import resolve_precision
from keras_resnet.benchmark.protocol import parse_task


def load_images(spec: dict):
    """The spec's folder as an ArrayBundle (decoded once, as a JAX run holds it)."""
    from keras_resnet.pipeline.data import arrays

    return arrays.load_arrays("folder", data_dir=spec["data_dir"],
                              image_size=spec["image_size"], batch_size=spec["batch_size"],
                              val_fraction=spec["val_fraction"], seed=spec["seed"])


def epoch_images(bundle, batch_size: int) -> int:
    """Training images of one epoch (full batches only)."""
    return bundle.steps_per_epoch(batch_size) * batch_size


def resolved_config(spec: dict):
    """The run the epochs belong to: ``--recipe=fast`` at the spec's depth and batch."""
    from keras_resnet.pipeline.run.config import TrainConfig, resolve

    return resolve(TrainConfig(depth=spec["depth"], recipe="fast", dataset="folder",
                               batch_size=spec["batch_size"], image_size=spec["image_size"],
                               seed=spec["seed"], epochs=30, fused_batch_norm=False))


class KerasEpochs:
    """keras_resnet trained through the device-resident loop on the Keras backend."""

    def __init__(self, spec):
        import keras

        from keras_resnet.pipeline.training import device_data, machine, network, optimization

        start = time.perf_counter()
        keras.utils.set_random_seed(spec["seed"])
        resolved = resolved_config(spec)
        arrays_bundle = load_images(spec)
        self.bundle = device_data.to_device(arrays_bundle)
        self.steps = self.bundle.steps_per_epoch(spec["batch_size"])
        policy = resolve_precision(spec["precision"], keras.config.backend())
        classes = self.bundle.num_classes
        self.model = network.build_training_model(resolved, classes, policy=policy)
        optimization.prepare_for_training(self.model, resolved, classes,
                                          steps_per_epoch=self.steps, jit_compile=True)
        self.epoch = 0
        self.per_call = spec.get("steps_per_call") or device_data.default_steps_per_call()
        trainable = sum(int(_prod(w.shape)) for w in self.model.trainable_weights)
        self.info = {"backend": keras.config.backend(), "keras": keras.__version__,
                     "precision": policy, "params_trainable": trainable,
                     "train_images": arrays_bundle.train_size, "classes": classes,
                     "steps_per_call": self.per_call,
                     "device": machine.accelerator() or "cpu",
                     "load_s": time.perf_counter() - start}

    def step(self, task):
        parse_task(task)
        stream = self.bundle.epochs(self.epoch)
        stream.fit(self.model, initial_epoch=self.epoch, epochs=self.epoch + 1,
                   steps_per_epoch=self.steps, steps_per_call=self.per_call)
        self.epoch += 1
        # fit ends by reading the epoch's metrics: the device is done.
        return float(self.model.history.history["loss"][-1])


class TorchEpochs:
    """The plain PyTorch twin trained on the same images, held on the device as uint8 and
    augmented there; channels_last, bfloat16 autocast or float32, eager or compiled."""

    def __init__(self, spec):
        import numpy as np
        import torch

        from keras_resnet.benchmark import torch_twins

        start = time.perf_counter()
        self.torch = torch
        torch.manual_seed(spec["seed"])
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        bundle = load_images(spec)
        self.batch = spec["batch_size"]
        self.steps = bundle.steps_per_epoch(self.batch)
        # NCHW uint8 on the device; batches become channels_last float32 there.
        self.images = torch.from_numpy(np.ascontiguousarray(
            bundle.train_images.transpose(0, 3, 1, 2))).to(self.device)
        self.labels = torch.from_numpy(bundle.train_labels.astype("int64")).to(self.device)
        resolved = resolved_config(spec)
        self.model = torch_twins.torch_resnet(torch_twins.torch_arch(resolved),
                                              bundle.num_classes).to(
            self.device, memory_format=torch.channels_last)
        self.forward = torch.compile(self.model) if spec.get("compile") else self.model
        decay = [p for p in self.model.parameters() if p.ndim > 1]
        rest = [p for p in self.model.parameters() if p.ndim <= 1]
        self.optimizer = torch.optim.SGD(
            [{"params": decay, "weight_decay": resolved.weight_decay},
             {"params": rest, "weight_decay": 0.0}], lr=resolved.learning_rate,
            momentum=resolved.momentum, nesterov=resolved.nesterov)
        self.loss = torch.nn.CrossEntropyLoss(label_smoothing=resolved.label_smoothing)
        self.bf16 = spec["precision"] == "mixed_bfloat16"
        self.generator = torch.Generator(device=self.device).manual_seed(spec["seed"])
        self.epoch = 0
        self.info = {"torch": torch.__version__, "precision": spec["precision"],
                     "compile": bool(spec.get("compile")), "memory_format": "channels_last",
                     "device": (torch.cuda.get_device_name() if self.device == "cuda"
                                else "cpu"),
                     "params_trainable": sum(p.numel() for p in self.model.parameters()
                                             if p.requires_grad),
                     "train_images": bundle.train_size, "load_s": time.perf_counter() - start}

    def augment(self, x):
        """Zero-pad by size/8, random crop back, random flip, on the device."""
        torch = self.torch
        n, _, height, width = x.shape
        pad = max(1, height // 8)
        g = self.generator
        top = torch.randint(0, 2 * pad + 1, (n,), device=x.device, generator=g) - pad
        left = torch.randint(0, 2 * pad + 1, (n,), device=x.device, generator=g) - pad
        flip = torch.rand(n, device=x.device, generator=g) < 0.5
        rows = top[:, None] + torch.arange(height, device=x.device)
        cols = left[:, None] + torch.arange(width, device=x.device)
        cols = torch.where(flip[:, None], cols.flip(1), cols)
        inside = (((rows >= 0) & (rows < height))[:, :, None]
                  & ((cols >= 0) & (cols < width))[:, None, :])
        out = x[torch.arange(n, device=x.device)[:, None, None], :,
                rows.clamp(0, height - 1)[:, :, None], cols.clamp(0, width - 1)[:, None, :]]
        out = out.permute(0, 3, 1, 2) * inside[:, None]  # gather put channels last
        return out.float().contiguous(memory_format=torch.channels_last)

    def step(self, task):
        parse_task(task)
        torch = self.torch
        self.model.train()
        order = torch.randperm(len(self.labels), device=self.device, generator=self.generator)
        loss = None
        for i in range(self.steps):
            picked = order[i * self.batch:(i + 1) * self.batch]
            x, y = self.augment(self.images[picked]), self.labels[picked]
            self.optimizer.zero_grad(set_to_none=True)
            with torch.autocast(self.device, dtype=torch.bfloat16, enabled=self.bf16):
                loss = self.loss(self.forward(x), y)
            loss.backward()
            self.optimizer.step()
        self.epoch += 1
        return float(loss.item())  # waits for the epoch's last step


def _prod(shape):
    n = 1
    for d in shape:
        n *= int(d)
    return n
