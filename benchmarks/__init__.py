"""Benchmarks (``hiddenlens.benchmarks``): each prints side-by-side ratios measured in one run and writes JSON."""
