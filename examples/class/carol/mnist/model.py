import torch.nn as nn
import torch.nn.functional as F

dropout_value = 0.05

class Net(nn.Module):
    def __init__(self):
        super(Net, self).__init__()
        self.convblock1 = nn.Sequential(nn.Conv2d(1, 8, 3, bias=False), nn.ReLU(), nn.BatchNorm2d(8))
        self.convblock2 = nn.Sequential(nn.Conv2d(8, 10, 3, bias=False), nn.ReLU(), nn.BatchNorm2d(10),
                                        nn.Dropout(dropout_value))
        self.pool1 = nn.MaxPool2d(2, 2)
        self.trans1 = nn.Sequential(nn.Conv2d(10, 8, 1, bias=False))
        self.convblock3 = nn.Sequential(nn.Conv2d(8, 12, 3, bias=False), nn.ReLU(), nn.BatchNorm2d(12))
        self.convblock4 = nn.Sequential(nn.Conv2d(12, 12, 3, bias=False), nn.ReLU(), nn.BatchNorm2d(12))
        self.convblock5 = nn.Sequential(nn.Conv2d(12, 12, 3, bias=False), nn.ReLU(), nn.BatchNorm2d(12))
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.out = nn.Conv2d(12, 10, 1, bias=False)

    def forward(self, x):
        x = self.convblock2(self.convblock1(x))
        x = self.trans1(self.pool1(x))
        x = self.convblock5(self.convblock4(self.convblock3(x)))
        x = self.out(self.gap(x))
        return F.log_softmax(x.view(-1, 10), dim=-1)


if __name__ == '__main__':
    print(Net())
