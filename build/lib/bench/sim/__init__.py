"""The simulator: the scheduling core driven on a virtual clock against cost-model workers."""
