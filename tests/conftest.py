import torch

# One intra-op thread per process: the multi-rank tests fork several ranks onto two cores.
torch.set_num_threads(1)
