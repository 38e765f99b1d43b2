"""Training: a recipe as a frozen config, MNIST as tensors with batched augmentation, the training loop, run
directories, and independent runs in worker processes."""
