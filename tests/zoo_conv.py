"""Convolutional test models for tests/architectures.py (tiny widths, CPU-fast)."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def _cbr(cin, cout, **kw):
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False, **kw),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class VGG(nn.Module):
    def __init__(self, num_classes: int = 5):
        super().__init__()
        self.features = nn.Sequential(_cbr(3, 8), _cbr(8, 8), nn.MaxPool2d(2),
                                      _cbr(8, 16), nn.MaxPool2d(2))
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(16 * 2 * 2, 12), nn.ReLU(),
                                        nn.Dropout(p=0.0), nn.Linear(12, num_classes))

    def forward(self, x):
        return self.classifier(self.features(x))


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                          nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """CIFAR ResNet: stem, layer1 = 2 identity blocks (8), layer2 = projection block + identity (16)."""

    def __init__(self, num_classes: int = 5):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.layer1 = nn.Sequential(BasicBlock(8, 8), BasicBlock(8, 8))
        self.layer2 = nn.Sequential(BasicBlock(8, 16, 2), BasicBlock(16, 16))
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer2(self.layer1(out))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.fc(out)


class PreActBlock(nn.Module):
    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        if stride != 1 or cin != cout:
            self.shortcut = nn.Conv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x):
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if hasattr(self, "shortcut") else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


class PreActResNet(nn.Module):
    def __init__(self, num_classes: int = 5):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, 1, 1, bias=False)
        self.layer1 = PreActBlock(8, 8)
        self.layer2 = PreActBlock(8, 16, 2)
        self.bn = nn.BatchNorm2d(16)
        self.linear = nn.Linear(16, num_classes)

    def forward(self, x):
        out = self.layer2(self.layer1(self.conv1(x)))
        out = F.relu(self.bn(out))
        out = F.avg_pool2d(out, 4).flatten(1)
        return self.linear(out)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin, planes, stride=1):
        super().__init__()
        cout = planes * self.expansion
        self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                            nn.BatchNorm2d(cout))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + identity)


class BottleneckResNet(nn.Module):
    def __init__(self, num_classes: int = 5):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.layer1 = Bottleneck(16, 4)        # 16 -> 4 -> 4 -> 16, identity shortcut
        self.layer2 = Bottleneck(16, 8, 2)     # 16 -> 8 -> 8 -> 32, projection shortcut
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x):
        x = self.layer2(self.layer1(self.stem(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


class ResNeXtBlock(nn.Module):
    def __init__(self, c=16, width=12, groups=3):
        super().__init__()
        self.conv_a = nn.Conv2d(c, width, 1, bias=False)
        self.bn_a = nn.BatchNorm2d(width)
        self.conv_b = nn.Conv2d(width, width, 3, padding=1, groups=groups, bias=False)
        self.bn_b = nn.BatchNorm2d(width)
        self.conv_c = nn.Conv2d(width, c, 1, bias=False)
        self.bn_c = nn.BatchNorm2d(c)

    def forward(self, x):
        out = F.relu(self.bn_a(self.conv_a(x)))
        out = F.relu(self.bn_b(self.conv_b(out)))
        return F.relu(x + self.bn_c(self.conv_c(out)))


class ResNeXt(nn.Module):
    def __init__(self, num_classes: int = 5):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.block = ResNeXtBlock()
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x):
        x = self.block(self.stem(x))
        return self.fc(x.mean(dim=(2, 3)))


class MobileNet(nn.Module):
    """Depthwise-separable blocks with ReLU6, then one inverted residual (expand/dw/project + x)."""

    def __init__(self, num_classes=5):
        super().__init__()

        def cbr6(cin, cout, k=3, s=1, g=1):
            return nn.Sequential(nn.Conv2d(cin, cout, k, s, k // 2, groups=g, bias=False),
                                 nn.BatchNorm2d(cout), nn.ReLU6(inplace=True))
        self.stem = cbr6(3, 8, s=2)
        self.dw1, self.pw1 = cbr6(8, 8, g=8), cbr6(8, 16, k=1)
        self.dw2, self.pw2 = cbr6(16, 16, s=2, g=16), cbr6(16, 16, k=1)
        self.expand = cbr6(16, 32, k=1)
        self.dw3 = cbr6(32, 32, g=32)
        self.project = nn.Sequential(nn.Conv2d(32, 16, 1, bias=False), nn.BatchNorm2d(16))
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x):
        x = self.pw1(self.dw1(self.stem(x)))
        x = self.pw2(self.dw2(x))
        x = x + self.project(self.dw3(self.expand(x)))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class DenseLayer(nn.Module):
    def __init__(self, cin, growth=4):
        super().__init__()
        self.bn = nn.BatchNorm2d(cin)
        self.conv = nn.Conv2d(cin, growth, 3, padding=1, bias=False)

    def forward(self, x):
        return torch.cat([x, self.conv(F.relu(self.bn(x)))], 1)


class DenseNet(nn.Module):
    def __init__(self, num_classes=5):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.dense = nn.Sequential(DenseLayer(8), DenseLayer(12))          # 8 -> 12 -> 16 channels
        self.trans = nn.Sequential(nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 8, 1, bias=False),
                                   nn.AvgPool2d(2))
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x):
        x = self.trans(self.dense(self.stem(x)))
        x = F.relu(self.bn(x))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class UNet(nn.Module):
    def __init__(self, out_ch=2):
        super().__init__()

        def double(cin, cout):
            return nn.Sequential(_cbr(cin, cout), _cbr(cout, cout))
        self.enc = double(3, 8)
        self.mid = double(8, 16)
        self.up = nn.Sequential(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
                                nn.Conv2d(16, 8, 3, padding=1))
        self.dec = double(16, 8)
        self.out = nn.Conv2d(8, out_ch, 1)

    def forward(self, x):
        s = self.enc(x)                                   # [B, 8, 8, 8]
        b = self.mid(F.max_pool2d(s, 2))                  # [B, 16, 4, 4]
        u = self.up(b)                                    # [B, 8, 8, 8]
        return self.out(self.dec(torch.cat([u, s], dim=1)))


class ConvTransposeAE(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = nn.Sequential(nn.Conv2d(3, 8, 4, 2, 1), nn.BatchNorm2d(8), nn.ReLU(),
                                 nn.Conv2d(8, 16, 4, 2, 1), nn.BatchNorm2d(16), nn.ReLU())
        self.dec = nn.Sequential(nn.ConvTranspose2d(16, 8, 4, 2, 1), nn.BatchNorm2d(8), nn.ReLU(),
                                 nn.ConvTranspose2d(8, 3, 4, 2, 1))

    def forward(self, x):
        return self.dec(self.enc(x))


class Conv1dNet(nn.Module):
    def __init__(self, num_classes=3):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv1d(2, 8, 3, padding=1), nn.BatchNorm1d(8)
        self.conv2 = nn.Conv1d(8, 8, 3, padding=1)
        self.fc1, self.fc2 = nn.Linear(8 * 4, 12), nn.Linear(12, num_classes)

    def forward(self, x):                                 # [B, 2, 16]
        x = F.max_pool1d(F.relu(self.bn1(self.conv1(x))), 2)
        x = F.max_pool1d(F.relu(self.conv2(x)), 2)        # [B, 8, 4]
        x = x.view(x.size(0), -1)                         # [B, 32]
        return self.fc2(F.relu(self.fc1(x)))


class Conv3dNet(nn.Module):
    def __init__(self, num_classes=3):
        super().__init__()
        self.body = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.BatchNorm3d(4), nn.ReLU(),
                                  nn.Conv3d(4, 8, 3, stride=2, padding=1), nn.BatchNorm3d(8), nn.ReLU(),
                                  nn.AdaptiveAvgPool3d(1), nn.Flatten())
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x):
        return self.fc(self.body(x))


class GroupNormNet(nn.Module):
    def __init__(self, num_classes=5):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.ReLU(),
            nn.Conv2d(8, 16, 3, padding=1), nn.GroupNorm(4, 16), nn.ReLU(),
            nn.Conv2d(16, 8, 3, padding=1), nn.GroupNorm(8, 8), nn.ReLU())
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x):
        return self.fc(self.body(x).mean(dim=(2, 3)))


class SplitNet(nn.Module):
    """Stem output chunked into two branches, concatenated back."""

    def __init__(self, num_classes=4):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 12, 3, padding=1), nn.BatchNorm2d(12), nn.ReLU())
        self.conv_a = nn.Conv2d(6, 4, 3, padding=1)
        self.conv_b = nn.Conv2d(6, 5, 3, padding=1)
        self.conv_m = nn.Conv2d(9, 8, 1)
        self.bn_m = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x):
        a, b = self.stem(x).chunk(2, dim=1)
        y = torch.cat([F.relu(self.conv_a(a)), F.relu(self.conv_b(b))], dim=1)
        z = F.relu(self.bn_m(self.conv_m(y)))
        return self.fc(z.mean(dim=(2, 3)))


class SENet(nn.Module):
    """Squeeze-and-excitation: x * sigmoid(fc2(relu(fc1(pool(x)))))."""

    def __init__(self, num_classes=3):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.se1, self.se2 = nn.Conv2d(16, 4, 1), nn.Conv2d(4, 16, 1)
        self.conv2 = nn.Conv2d(16, 8, 3, padding=1)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x):
        x = self.stem(x)
        s = torch.sigmoid(self.se2(F.relu(self.se1(F.adaptive_avg_pool2d(x, 1)))))
        x = F.relu(self.conv2(x * s))
        return self.fc(x.mean(dim=(2, 3)))


class LayerNorm2d(nn.Module):
    """ConvNeXt's channels-first LayerNorm written with mean over dim 1 and w[:, None, None]."""

    def __init__(self, c, eps=1e-6):
        super().__init__()
        self.weight, self.bias, self.eps = nn.Parameter(torch.ones(c)), nn.Parameter(torch.zeros(c)), eps

    def forward(self, x):
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        x = (x - u) / torch.sqrt(s + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class ConvNeXtBlock(nn.Module):
    def __init__(self, dim=16, hidden=32):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1, self.act, self.pwconv2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)
        self.gamma = nn.Parameter(0.5 + torch.rand(dim))           # layer scale

    def forward(self, x):
        y = self.dwconv(x).permute(0, 2, 3, 1)                     # channels last
        y = self.pwconv2(self.act(self.pwconv1(self.norm(y))))
        return x + (self.gamma * y).permute(0, 3, 1, 2)


class ConvNeXt(nn.Module):
    def __init__(self, num_classes=5, dim=16):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, dim, 4, stride=4), LayerNorm2d(dim))
        self.blocks = nn.Sequential(ConvNeXtBlock(dim), ConvNeXtBlock(dim))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):
        x = self.blocks(self.stem(x))
        return self.head(self.norm(x.mean([-2, -1])))


class PixelShuffleNet(nn.Module):
    """conv 16 -> PixelShuffle(2) -> 4 channels: the conv's output is (4 x 2 x 2), 2 x 2 spatial."""

    def __init__(self, num_classes=3):
        super().__init__()
        self.conv1, self.shuffle = nn.Conv2d(3, 16, 3, padding=1), nn.PixelShuffle(2)
        self.conv2, self.fc = nn.Conv2d(4, 8, 3, padding=1), nn.Linear(8, num_classes)

    def forward(self, x):
        x = F.relu(self.conv2(self.shuffle(self.conv1(x))))
        return self.fc(x.mean((2, 3)))

