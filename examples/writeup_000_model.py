"""Model_4 of the write-up ../shared/seeds/000_aa732a04f65c07e3.txt ("Model Version 4"), rebuilt from its published
summary: 7,901 parameters, claimed "Test Accuracy : 99.42" and "consistently achieved 99.4 Accuracy in 9 and 10
Epoch". The summary lists Conv2d, BatchNorm2d and Dropout2d modules but no ReLU, so ReLU is a function in forward,
placed after each convolution (conv -> ReLU -> BN -> dropout, as the write-ups do). The dropout value of this version is
not stated; 0.01 is the one its previous version (V3a) states. Written as students write model.py: plain PyTorch,
no tinymnist import.

    tinymnist check --models examples/writeup_000_model.py --model Model_4 --seeds 2 --jobs 2
"""

import torch.nn as nn
import torch.nn.functional as F

dropout_value = 0.01


class Model_4(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 7, 3, bias=False)    # 26x26
        self.bn1 = nn.BatchNorm2d(7)
        self.conv2 = nn.Conv2d(7, 16, 3, bias=False)   # 24x24
        self.bn2 = nn.BatchNorm2d(16)
        self.conv3 = nn.Conv2d(16, 12, 1, bias=False)  # 24x24, transition
        self.pool = nn.MaxPool2d(2, 2)                 # 12x12
        self.conv4 = nn.Conv2d(12, 16, 3, bias=False)  # 10x10
        self.bn4 = nn.BatchNorm2d(16)
        self.conv5 = nn.Conv2d(16, 16, 3, bias=False)  # 8x8
        self.bn5 = nn.BatchNorm2d(16)
        self.conv6 = nn.Conv2d(16, 16, 3, bias=False)  # 6x6
        self.bn6 = nn.BatchNorm2d(16)
        self.drop = nn.ModuleList(nn.Dropout2d(dropout_value) for _ in range(5))
        self.gap = nn.AvgPool2d(6)                     # 1x1
        self.conv7 = nn.Conv2d(16, 10, 1, bias=False)

    def forward(self, x):
        x = self.drop[0](self.bn1(F.relu(self.conv1(x))))
        x = self.drop[1](self.bn2(F.relu(self.conv2(x))))
        x = self.pool(self.conv3(x))
        x = self.drop[2](self.bn4(F.relu(self.conv4(x))))
        x = self.drop[3](self.bn5(F.relu(self.conv5(x))))
        x = self.drop[4](self.bn6(F.relu(self.conv6(x))))
        x = self.conv7(self.gap(x))
        return F.log_softmax(x.view(-1, 10), dim=-1)
