"""Pure-PyTorch references of every op: the ground truth the kernels are tested against."""
