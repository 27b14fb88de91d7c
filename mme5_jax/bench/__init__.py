"""Throughput benchmarking: an analytic FLOPs model (MFU/HFU), chip peaks, and the `mme5 bench` runner."""
