"""ResNet trunks (torchvision's blocks and layout) returning the maps of every stage.

With width 64 and output stride 32 the parameters are exactly torchvision's resnet18/50
(without the classifier), so their state dicts load as they are. A smaller width and an
output stride of 16 or 8 are options for small images and CPU budgets. `stage4_only` makes
the forward return the stage-4 map alone (what the label and cluster stages take).
`zero_init_residual` starts each residual branch at zero (SwAV's torchvision option); PASS's
reference code leaves it off.
"""
from __future__ import annotations

import torch
from torch import nn
from torchvision.models import resnet as tv

ARCHS = {
    "resnet18": (tv.BasicBlock, [2, 2, 2, 2]),
    "resnet34": (tv.BasicBlock, [3, 4, 6, 3]),
    "resnet50": (tv.Bottleneck, [3, 4, 6, 3]),
    "resnet101": (tv.Bottleneck, [3, 4, 23, 3]),
}


class ResNetTrunk(tv.ResNet):
    def __init__(self, arch: str = "resnet50", width: int = 64, output_stride: int = 32,
                 zero_init_residual: bool = False, stage4_only: bool = False):
        if arch not in ARCHS:
            raise ValueError(f"unknown arch {arch!r}; one of {sorted(ARCHS)}")
        if output_stride not in (8, 16, 32):
            raise ValueError(f"output_stride must be 8, 16 or 32, not {output_stride}")
        block, layers = ARCHS[arch]
        nn.Module.__init__(self)
        self._norm_layer = nn.BatchNorm2d
        self.inplanes, self.dilation, self.groups, self.base_width = width, 1, 1, 64
        self.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        # Removing a stride: Bottleneck dilates (as torchvision); BasicBlock cannot, so it
        # simply keeps stride 1.
        keep3, keep4 = output_stride == 8, output_stride <= 16
        dilate = block is tv.Bottleneck
        self.layer1 = self._make_layer(block, width, layers[0])
        self.layer2 = self._make_layer(block, width * 2, layers[1], stride=2)
        self.layer3 = self._make_layer(block, width * 4, layers[2], stride=1 if keep3 and not dilate else 2,
                                       dilate=keep3 and dilate)
        self.layer4 = self._make_layer(block, width * 8, layers[3], stride=1 if keep4 and not dilate else 2,
                                       dilate=keep4 and dilate)
        # Channels of stage s's map: stage_channels[s] for s = 1..4.
        self.stage_channels = {s: width * 2 ** (s - 1) * block.expansion for s in range(1, 5)}
        self.stage3_channels = self.stage_channels[3]
        self.stage4_channels = self.out_channels = self.stage_channels[4]
        self.stage4_only = stage4_only
        self.output_stride = output_stride
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:  # each residual branch starts as identity
            for m in self.modules():
                if isinstance(m, tv.Bottleneck):
                    nn.init.zeros_(m.bn3.weight)
                elif isinstance(m, tv.BasicBlock):
                    nn.init.zeros_(m.bn2.weight)

    def forward(self, x: torch.Tensor):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        stage1 = self.layer1(x)
        stage2 = self.layer2(stage1)
        stage3 = self.layer3(stage2)
        stage4 = self.layer4(stage3)
        if self.stage4_only:
            return stage4
        return {"stage1": stage1, "stage2": stage2, "stage3": stage3, "stage4": stage4}



def build_trunk(model_cfg: dict, stage4_only: bool = False) -> ResNetTrunk:
    """The run's backbone from its config's `model` section (arch, width, output_stride)."""
    return ResNetTrunk(model_cfg["arch"], width=model_cfg["width"],
                       output_stride=model_cfg["output_stride"],
                       zero_init_residual=bool(model_cfg.get("zero_init_residual", False)),
                       stage4_only=stage4_only)
