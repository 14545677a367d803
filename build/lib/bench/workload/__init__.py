"""Workloads and ground truth: the six-application request sets and their true output lengths."""
