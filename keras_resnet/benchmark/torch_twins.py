"""Plain PyTorch twins of keras_resnet models, for the ``compare`` mode.

PyTorch is a benchmark-only extra (``pip install -e '.[bench]'``): torch is imported only
inside the functions here, never when this module is imported.
"""

from __future__ import annotations

import importlib.util

from keras_resnet.benchmark.benches import apply_threads
from keras_resnet.benchmark.errors import BenchmarkError
from keras_resnet.benchmark.protocol import parse_task, random_images, random_labels

BENCH_EXTRA = "pip install -e '.[bench]'"


def torch_available() -> bool:
    return importlib.util.find_spec("torch") is not None


def need_torch(why: str) -> None:
    """Raises BenchmarkError saying how to install PyTorch when it is missing."""
    if not torch_available():
        raise BenchmarkError(f"{why} needs PyTorch, which is not installed; {BENCH_EXTRA}")


def torch_arch(resolved) -> dict:
    """The architecture fields of a keras_resnet model that has a plain PyTorch twin.

    Args:
        resolved: a :class:`keras_resnet.pipeline.run.config.ResolvedConfig`.

    Raises:
        BenchmarkError: the model has no twin here.
    """
    a = resolved.architecture
    cifar_a = (a["stem"] == "cifar" and a["block"] == "basic" and a["shortcut"] == "zeropad")
    imagenet = (a["stem"] == "imagenet" and a["shortcut"] == "projection")
    plain = (not a["preact"] and a["groups"] == 1 and a["width_per_group"] == 64
             and a["width_factor"] == 1 and not a["se_ratio"] and not a["keras_applications"]
             and a["residual_scale"] == 1.0 and not a["stochastic_depth"])
    if not (plain and (cifar_a or imagenet)):
        raise BenchmarkError(
            f"{resolved.model} has no plain PyTorch twin here; the PyTorch comparison covers "
            "CIFAR option-A ResNets (resnet20, resnet56, ...) and ImageNet "
            "ResNet-18/34/50/101/152/200 without model_options")
    return {k: a[k] for k in ("block", "depths", "widths", "stem", "stem_width")}


class TorchBench:
    """The plain PyTorch twin of a keras_resnet model, trained as keras_resnet's recipe.

    ``spec["precision"]`` "mixed_bfloat16" runs forward and loss under bfloat16 autocast
    (PyTorch's mixed precision: float32 weights, bfloat16 matmuls and convolutions), "auto"
    does so where tools/train.py would train keras_resnet in bfloat16; ``spec["compile"]``
    wraps the model in ``torch.compile``.
    """

    def __init__(self, spec):
        apply_threads(spec)
        import torch

        from keras_resnet.pipeline.training.machine import bf16_flags, host_cpu_flags

        self.torch = torch
        torch.manual_seed(spec["seed"])
        fmt = torch.channels_last if spec["channels_last"] else torch.contiguous_format
        cuda = torch.cuda.is_available()
        self.device = "cuda" if cuda else "cpu"
        precision = spec.get("precision", "float32")
        if precision == "auto":  # bfloat16 on GPUs and on CPUs with native bfloat16
            native = cuda or bf16_flags(host_cpu_flags())
            precision = "mixed_bfloat16" if native else "float32"
        self.precision = precision
        if spec.get("torchvision"):  # the reference model itself (ResNet-50 v1.5)
            import torchvision

            net = getattr(torchvision.models, spec["model"])(num_classes=spec["classes"])
        else:
            net = torch_resnet(spec["arch"], spec["classes"])
        self.model = net.to(self.device, memory_format=fmt)
        self.forward = torch.compile(self.model) if spec.get("compile") else self.model
        decay = [p for p in self.model.parameters() if p.ndim > 1]  # conv / linear kernels
        rest = [p for p in self.model.parameters() if p.ndim <= 1]  # BN and biases
        recipe = spec["recipe"]
        # keras_resnet's coupled L2 of wd/2 * sum(w^2) on kernels is SGD weight_decay=wd.
        self.optimizer = torch.optim.SGD(
            [{"params": decay, "weight_decay": recipe["weight_decay"]},
             {"params": rest, "weight_decay": 0.0}],
            lr=recipe["learning_rate"], momentum=recipe["momentum"])
        self.loss = torch.nn.CrossEntropyLoss(label_smoothing=recipe["label_smoothing"])
        self.inputs = {}
        self.size, self.classes, self.fmt = spec["image_size"], spec["classes"], fmt
        for task in spec["tasks"]:
            self._inputs(parse_task(task)[1], spec["seed"])
        self.info = {"torch": torch.__version__, "torch_threads": torch.get_num_threads(),
                     "params_trainable": sum(p.numel() for p in self.model.parameters()
                                             if p.requires_grad),
                     "memory_format": "channels_last" if spec["channels_last"] else "nchw",
                     "precision": self.precision, "compile": bool(spec.get("compile")),
                     "device": (torch.cuda.get_device_name() if cuda else "cpu"),
                     "model_source": "torchvision" if spec.get("torchvision") else "twin",
                     "image_size": self.size, "classes": self.classes}

    def _inputs(self, batch, seed=0):
        if batch not in self.inputs:
            torch = self.torch
            x = torch.from_numpy(random_images(batch, self.size, seed).transpose(0, 3, 1, 2))
            x = x.to(self.device).contiguous(memory_format=self.fmt)
            y = torch.from_numpy(random_labels(batch, self.classes, seed)).long().to(self.device)
            self.inputs[batch] = (x, y)
        return self.inputs[batch]

    def step(self, task):
        kind, batch = parse_task(task)
        x, y = self._inputs(batch)
        bf16 = self.torch.autocast(self.device, dtype=self.torch.bfloat16,
                                   enabled=self.precision == "mixed_bfloat16")
        if kind == "train":
            self.model.train()
            self.optimizer.zero_grad(set_to_none=True)
            with bf16:
                loss = self.loss(self.forward(x), y)
            loss.backward()
            self.optimizer.step()
            return float(loss.item())
        self.model.eval()
        with self.torch.inference_mode(), bf16:
            return float(self.forward(x)[0, 0].item())


def torch_resnet(arch: dict, classes: int):
    """Plain PyTorch ResNets equal to keras_resnet's in layers and trainable parameters.

    CIFAR nets (He et al. 2015 §4.2): 3x3 stem, widths 16-32-64, basic blocks, option-A
    shortcuts (subsample, zero-pad channels: no parameters). ImageNet nets: 7x7/2 stem and
    max-pool, basic (18/34) or v1.5 bottleneck blocks (stride on the 3x3 conv, as
    torchvision), projection shortcuts. Raw 0..255 pixels are normalised first, as
    keras_resnet models built with include_preprocessing=True do.

    Args:
        arch: the fields :func:`torch_arch` returns.
        classes: outputs of the final linear layer.
    """
    import torch
    import torch.nn.functional as F
    from torch import nn

    def conv_bn(cin, cout, k, stride):
        return [nn.Conv2d(cin, cout, k, stride, k // 2, bias=False), nn.BatchNorm2d(cout)]

    class Basic(nn.Module):
        def __init__(self, cin, width, stride, option_a):
            super().__init__()
            self.conv1, self.bn1 = conv_bn(cin, width, 3, stride)
            self.conv2, self.bn2 = conv_bn(width, width, 3, 1)
            self.stride, self.pad = stride, width - cin
            self.project = None
            if not option_a and (stride != 1 or cin != width):
                self.project = nn.Sequential(*conv_bn(cin, width, 1, stride))

        def forward(self, x):
            out = F.relu(self.bn1(self.conv1(x)))
            out = self.bn2(self.conv2(out))
            if self.project is not None:
                shortcut = self.project(x)
            elif self.stride != 1 or self.pad:
                shortcut = x[:, :, ::self.stride, ::self.stride]
                shortcut = F.pad(shortcut, (0, 0, 0, 0, self.pad // 2,
                                            self.pad - self.pad // 2))
            else:
                shortcut = x
            return F.relu(out + shortcut)

    class Bottleneck(nn.Module):
        def __init__(self, cin, width, stride, option_a):
            super().__init__()
            self.conv1, self.bn1 = conv_bn(cin, width, 1, 1)
            self.conv2, self.bn2 = conv_bn(width, width, 3, stride)
            self.conv3, self.bn3 = conv_bn(width, 4 * width, 1, 1)
            self.project = None
            if stride != 1 or cin != 4 * width:
                self.project = nn.Sequential(*conv_bn(cin, 4 * width, 1, stride))

        def forward(self, x):
            out = F.relu(self.bn1(self.conv1(x)))
            out = F.relu(self.bn2(self.conv2(out)))
            out = self.bn3(self.conv3(out))
            shortcut = x if self.project is None else self.project(x)
            return F.relu(out + shortcut)

    class ResNet(nn.Module):
        def __init__(self):
            super().__init__()
            mean = torch.tensor([0.485, 0.456, 0.406]) * 255
            std = torch.tensor([0.229, 0.224, 0.225]) * 255
            self.register_buffer("mean", mean.view(1, 3, 1, 1))
            self.register_buffer("std", std.view(1, 3, 1, 1))
            cifar = arch["stem"] == "cifar"
            width = arch["stem_width"]
            if cifar:
                self.stem = nn.Sequential(*conv_bn(3, width, 3, 1), nn.ReLU())
            else:
                self.stem = nn.Sequential(*conv_bn(3, width, 7, 2), nn.ReLU(),
                                          nn.MaxPool2d(3, 2, 1))
            block = Bottleneck if arch["block"] == "bottleneck" else Basic
            expansion = 4 if block is Bottleneck else 1
            layers, cin = [], width
            for stage, (depth, w) in enumerate(zip(arch["depths"], arch["widths"],
                                                   strict=True)):
                for i in range(depth):
                    stride = 2 if stage > 0 and i == 0 else 1
                    layers.append(block(cin, w, stride, cifar))
                    cin = w * expansion
            self.stages = nn.Sequential(*layers)
            self.fc = nn.Linear(cin, classes)

        def forward(self, x):
            x = self.stages(self.stem((x - self.mean) / self.std))
            return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))

    return ResNet()
