"""pytest set-up shared by every test file: tiny tensors are fastest (and least noisy) on one thread."""
import torch

torch.set_num_threads(1)
