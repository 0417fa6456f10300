import torch

# Tests run many tiny models; one intra-op thread is fastest for them and keeps the suite
# insensitive to other load on a 2-core machine (OpenMP threads spin badly when oversubscribed).
torch.set_num_threads(1)
