import os
from tqdm import tqdm


def train(model, device, loader, optimizer, epoch):
    pass


def test(model, device, loader):
    pass
